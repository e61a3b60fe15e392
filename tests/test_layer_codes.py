"""layer_codes.py: a streamed layer reads exactly as one held in memory; the budget decides which."""
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.errors import CacheError
from pipeline.layer_codes import CachedLayer, Scaler, resolve_layer, spread_by_class
from test_train import FIVE, make_cache
from test_heads import blobs


@pytest.fixture(scope="module")
def layers(tmp_path_factory):
    """The same cache opened in memory and streamed in blocks of 7 rows (a tiny block size)."""
    X, y = blobs(n_per_class=50, dim=9, classes=3, seed=4)
    path = make_cache(tmp_path_factory.mktemp("lc") / "toy" / "m-random.h5", X * 3 + 1, y,
                      np.array(FIVE * (len(y) // 5)), ["a", "b", "c"])
    streamed = CachedLayer(path, "fc7", memory_budget=0)
    streamed.block_bytes = 7 * 9 * 4
    return CachedLayer(path, "fc7"), streamed, X * 3 + 1


def test_the_budget_decides(layers):
    in_memory, streamed, X = layers
    assert in_memory.in_memory and in_memory.X is not None
    assert not streamed.in_memory and streamed.X is None
    assert not CachedLayer(in_memory.path, "fc7", memory_budget=X.size * 4 * 3 - 1).in_memory
    assert CachedLayer(in_memory.path, "fc7", memory_budget=X.size * 4 * 3).in_memory


def test_streaming_reads_what_memory_holds(layers):
    in_memory, streamed, X = layers
    for splits in (("train",), ("train", "val")):
        a, b = in_memory.scaler(*splits), streamed.scaler(*splits)
        np.testing.assert_allclose(a.mean, b.mean)
        np.testing.assert_allclose(a.scale, b.scale)
        rows = in_memory.rows(*splits)
        np.testing.assert_allclose(a.mean, X[rows].astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(a.scale, X[rows].astype(np.float64).std(0), rtol=1e-6)
    scaler = in_memory.scaler("train")
    rows = np.array([0, 3, 8, 9, 40, 149])
    np.testing.assert_array_equal(in_memory.matrix(rows, scaler), streamed.matrix(rows, scaler))
    for splits in (("test",), ("val", "test")):
        got = [np.concatenate(part) for part in zip(*streamed.blocks(splits, scaler))]
        want = [np.concatenate(part) for part in zip(*in_memory.blocks(splits, scaler))]
        np.testing.assert_array_equal(got[0], in_memory.rows(*splits))
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("which", [0, 1])
def test_batches_give_every_row_of_the_splits_once(layers, which):
    layer = layers[which]
    scaler = Scaler(np.zeros(9), np.ones(9))
    seen = [(X, y) for X, y in layer.batches(("train", "val"), scaler, 16, seed=which)]
    X = np.concatenate([x for x, _ in seen])
    rows = layer.rows("train", "val")
    assert len(X) == len(rows) and all(len(x) <= 16 for x, _ in seen)
    order = np.lexsort(X.T)
    want = layers[2][rows]
    np.testing.assert_allclose(X[order], want[np.lexsort(want.T)], rtol=1e-6)
    assert sorted(np.concatenate([y for _, y in seen])) == sorted(layer.labels[rows])


def test_standardising_leaves_the_cached_codes_as_they_are(layers):
    in_memory, _, X = layers
    before = in_memory.X.copy()
    scaler = in_memory.scaler("train", "val")
    rows = in_memory.rows("train", "val")
    want = (X[rows].astype(np.float64) - scaler.mean) / scaler.scale
    np.testing.assert_allclose(in_memory.matrix(rows, scaler), want, rtol=1e-5, atol=1e-5)
    for _ in in_memory.batches(("train",), scaler, 16, seed=0):
        pass
    list(in_memory.blocks(("test",), scaler))
    np.testing.assert_array_equal(in_memory.X, before)  # every standardised copy was the caller's own
    raw = X[:4].astype(np.float32)
    np.testing.assert_allclose(scaler(raw), (raw - scaler.mean) / scaler.scale, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(raw, X[:4].astype(np.float32))  # __call__ copies; in_place writes
    assert scaler.in_place(raw) is raw


def test_a_class_sorted_cache_streams_mixed(tmp_path):
    """Class folders give a cache in class order: streamed in row order, each block held one or two classes
    and the refit drifted toward the last ones (a linear SVM lost 5 points on such a cache)."""
    y = np.repeat(np.arange(10), 60)
    X = np.stack([np.arange(len(y)), y, np.zeros(len(y))], axis=1).astype(np.float32)  # row index, class, 0
    path = make_cache(tmp_path / "toy" / "m-random.h5", X, y, np.array(["train"] * len(y)), list("abcdefghij"))
    layer = CachedLayer(path, "fc7", memory_budget=0)
    layer.block_bytes = 60 * 3 * 4  # 60 rows a block: one class, when read in row order
    batches = list(layer.batches(("train",), Scaler(np.zeros(3), np.ones(3)), 60, seed=0))
    assert all(len(np.unique(labels)) == 10 for _, labels in batches)  # every class in every block
    rows, labels = np.concatenate([x[:, 0] for x, _ in batches]).astype(int), np.concatenate([c for _, c in batches])
    np.testing.assert_array_equal(np.sort(rows), np.arange(len(y)))  # every row once
    np.testing.assert_array_equal(labels, y[rows])                   # each with its own label


def test_spread_by_class_gives_each_stretch_of_the_order_every_class():
    labels = np.repeat(np.arange(7), 5)  # 7 classes of 5 pieces each, in class order
    order = spread_by_class(labels, np.random.default_rng(0))
    assert sorted(order) == list(range(35))
    for lo in range(0, 35, 7):  # the k-th pieces of all the classes come k-th
        assert sorted(labels[order[lo:lo + 7]]) == list(range(7))
    assert not np.array_equal(order, spread_by_class(labels, np.random.default_rng(1)))


def test_a_tap_alone_means_its_avg_pooling_as_extract_names_it():
    cache = SimpleNamespace(path="c.h5", attrs={"penultimate": "avgpool"},
                            layers=["avgpool", "layer3:avg", "layer2:max"])
    assert resolve_layer(cache, "penultimate") == "avgpool" and resolve_layer(cache, "layer3") == "layer3:avg"
    with pytest.raises(CacheError, match=r"no layer 'layer2' \(a tap alone means layer2:avg\); it has layer2:max: "
                                         r"give LAYER=layer2:max"):
        resolve_layer(cache, "layer2")
    with pytest.raises(CacheError, match="no layer 'layer4'; it has avgpool, layer3:avg, layer2:max"):
        resolve_layer(cache, "layer4")
