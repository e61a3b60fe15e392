"""train.py: one head on one cached layer: C chosen on val only, test scored once, head and result saved."""
import json

import numpy as np
import pytest

from pipeline.errors import CacheError, PipelineError
from pipeline.heads import LinearHead
from pipeline.sources import Batch
from pipeline.store import HEADS, PartialCache, read_result
from pipeline.train import train_head
from test_heads import blobs

FIVE = ["train", "train", "train", "val", "test"]


def make_cache(path, X, y, split, class_names, created=None):
    """A finished cache of one layer, fc7, holding X (made at `created`, an ISO date, when given)."""
    writer = PartialCache.create(path, ids=[f"img{i}.png" for i in range(len(y))], labels=y, split=split,
                                 class_names=class_names, layer_dims={"fc7": (X.shape[1], {"pooling": "none"})},
                                 attrs={"dataset": "toy", "model": "vgg16", "weights": "random",
                                        "settings": {"layers": ["fc7"]}, "penultimate": "fc7", "precision": "fp32"})
    writer.append(Batch(np.arange(len(y)), None, [""] * len(y), [""] * len(y)), {"fc7": X})
    writer.finish({"created": created} if created else {})
    return path


@pytest.fixture
def cache(tmp_path):
    X, y = blobs()
    return make_cache(tmp_path / "toy" / "vgg16-random.h5", X, y, np.array(FIVE * (len(y) // 5)), ["cat", "dog", "emu"])


@pytest.mark.parametrize("head", sorted(HEADS))
def test_train_head_round_trip(cache, head):
    result = train_head(cache, "penultimate", head)
    assert result["layer"] == "fc7" and result["head"] == head and result["dim"] == 20
    assert (result["n_train"], result["n_val"], result["n_test"]) == (108, 36, 36)
    assert result["test_accuracy"] > 0.9 and result["val_accuracy"] == max(g["val_accuracy"] for g in result["grid"])
    assert np.array(result["confusion_matrix"]).sum() == 36
    assert read_result(cache.parent / "heads" / f"vgg16-random.fc7.{head}.json") == json.loads(json.dumps(result))
    loaded = LinearHead(result["head_file"])
    X, y = blobs()
    test = slice(4, None, 5)  # the test rows
    assert (loaded.predict(X[test]) == np.array(["cat", "dog", "emu"])[y[test]]).mean() == pytest.approx(
        result["test_accuracy"])
    assert loaded.provenance["model"] == "vgg16" and loaded.attrs["C"] == result["C"]


def test_binary_heads_round_trip(tmp_path):
    X, y = blobs(classes=2, spread=0.4, seed=3)
    split = np.array(FIVE * (len(y) // 5))
    path = make_cache(tmp_path / "bin" / "vgg16-random.h5", X, y, split, ["no", "yes"])
    for head in ("svm", "softmax"):
        result = train_head(path, "fc7", head)
        predicted = LinearHead(result["head_file"]).predict(X[split == "test"])
        assert (predicted == np.array(["no", "yes"])[y[split == "test"]]).mean() == pytest.approx(result["test_accuracy"])


def test_strength_is_chosen_without_looking_at_test(tmp_path):
    """Scrambling the test labels changes the test score and nothing else."""
    X, y = blobs(spread=0.6)
    split = np.array(FIVE * (len(y) // 5))
    honest = train_head(make_cache(tmp_path / "a" / "m-random.h5", X, y, split, ["a", "b", "c"]), "fc7", "softmax")
    y_scrambled = y.copy()
    y_scrambled[split == "test"] = np.random.default_rng(1).permutation(y[split == "test"])
    scrambled = train_head(make_cache(tmp_path / "b" / "m-random.h5", X, y_scrambled, split, ["a", "b", "c"]),
                           "fc7", "softmax")
    assert scrambled["C"] == honest["C"] and scrambled["grid"] == honest["grid"]
    assert scrambled["test_accuracy"] < honest["test_accuracy"]


def test_sklearn_selection_fits_on_train_and_the_refit_on_train_and_val(cache, monkeypatch):
    from pipeline import heads, train
    real, sizes = heads.fit, {"select": [], "refit": []}

    def recording(kind):
        return lambda name, C, X, y: sizes[kind].append(len(y)) or real(name, C, X, y)
    monkeypatch.setattr(heads, "fit", recording("select"))
    monkeypatch.setattr(train, "fit", recording("refit"))
    result = train_head(cache, "fc7", "svm", solver="sklearn")
    assert sizes == {"select": [108] * 9, "refit": [108 + 36]}
    assert result["solver"] == "scikit-learn LinearSVC, one fit per C" and result["select_rows"] == 108


def test_train_head_errors(cache, tmp_path):
    with pytest.raises(CacheError, match=r"no layer 'conv3'.*fc7.*make extract LAYERS=conv3"):
        train_head(cache, "conv3", "svm")
    with pytest.raises(PipelineError, match="unknown head 'tree'"):
        train_head(cache, "fc7", "tree")
    X, y = blobs(classes=2)
    no_val = make_cache(tmp_path / "nv" / "m-random.h5", X, y, np.array(["train", "test"] * 60), ["a", "b"])
    with pytest.raises(CacheError, match="val split is empty"):
        train_head(no_val, "fc7", "svm")
    no_train = make_cache(tmp_path / "nt" / "m-random.h5", X, y, np.array(["train"] * 60 + ["val", "test"] * 30),
                          ["a", "b"])
    with pytest.raises(CacheError, match=r"classes \['b'\] have no train images"):
        train_head(no_train, "fc7", "svm")
    one_class = make_cache(tmp_path / "one" / "m-random.h5", X, np.zeros_like(y), np.array(FIVE * (len(y) // 5)),
                           ["cars"])
    for head in ("svm", "softmax"):  # a traceback from scikit-learn, and a "perfect" svm, before
        with pytest.raises(CacheError, match=r"one class only \(cars\); a classifier needs at least two"):
            train_head(one_class, "fc7", head)


def test_auto_takes_scikit_learn_for_small_softmax_heads_and_torch_otherwise(cache, monkeypatch):
    from pipeline import train
    assert "scikit-learn LogisticRegression" in train_head(cache, "fc7", "softmax")["solver"]
    assert "torch squared hinge" in train_head(cache, "fc7", "svm")["solver"]
    assert "torch" in train_head(cache, "fc7", "linear")["solver"]
    assert "streamed" in train_head(cache, "fc7", "softmax", memory_budget=0)["solver"]
    monkeypatch.setattr(train, "SKLEARN_AT_MOST", 108 * 20 - 1)  # train rows x dims, one value too many
    assert "torch" in train_head(cache, "fc7", "softmax")["solver"]
    with pytest.raises(PipelineError, match="unknown solver 'scipy'; use one of auto, torch, sklearn"):
        train_head(cache, "fc7", "softmax", solver="scipy")


def test_a_class_test_lacks_is_not_scored_as_a_zero(tmp_path, recwarn):
    X, y = blobs(spread=4.0)  # far apart: every test image right
    y = np.where(y == 2, 1, y)  # ... and "emu" never true, in any split
    y[0] = 2  # one emu, in train
    path = make_cache(tmp_path / "toy" / "m-random.h5", X, y, np.array(FIVE * (len(y) // 5)), ["cat", "dog", "emu"])
    result = train_head(path, "fc7", "softmax", solver="torch")
    assert result["test_accuracy"] == 1.0 and result["per_class"][2]["support"] == 0
    assert result["test_macro_f1"] == 1.0  # 0.667 before: emu, neither in test nor predicted, counted as F1 0
    assert not [w for w in recwarn.list if "y_true" in str(w.message)]


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("memory_budget", [None, 0])
def test_codes_that_are_nan_or_inf_are_refused_with_the_image_and_the_remedy(tmp_path, value, memory_budget):
    """One NaN trained the linear head to chance and an inf failed with torch's own words (audit)."""
    X, y = blobs()
    X[7, 3] = value
    bad = make_cache(tmp_path / "toy" / "vgg16-random.h5", X, y, np.array(FIVE * (len(y) // 5)), ["cat", "dog", "emu"])
    with pytest.raises(CacheError, match=r"layer fc7 holds codes that are NaN or inf \(first: img7\.png\).*REBUILD=1 "
                                         r"\(it was made in fp32"):
        train_head(bad, "fc7", "linear", solver="torch", memory_budget=memory_budget)
