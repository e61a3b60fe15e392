"""Stage one: the cache it writes, cache hits, stale caches, resume, and that every
execution path (precision, batch size, workers) gives the same codes."""
import h5py
import numpy as np
import pytest

from conftest import write_image
from pipeline.backbones import load_backbone
from pipeline.datasets import load_dataset
from pipeline.errors import IncompleteCacheError
from pipeline.extract import extract_features, resolve_precision
from pipeline.store import CacheWriter, FeatureCache, partial_path

COLORS = {"red": (220, 40, 40), "blue": (40, 40, 220)}


@pytest.fixture
def folder(tmp_path):
    """An ImageFolder with its own splits: 8 train, 4 val, 4 test per class."""
    root = tmp_path / "data" / "toy"
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        for name, color in COLORS.items():
            for i in range(n):
                write_image(root / split / name / f"{i}.png", size=(40 + i, 30), color=color)
    return root


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("mobilenet_v2", "none")


def run(folder, backbone, layers=("penultimate",), **options):
    options = {"precision": "fp32", "batch_size": 5, "num_workers": 0, "progress": False, **options}
    table = load_dataset(folder.name, folder.parent)
    return extract_features(table, backbone, list(layers), folder.parent.parent / "features", **options)


def test_cache_layout(folder, backbone):
    result = run(folder, backbone, ["penultimate", "features.4"])
    assert result.status == "extracted" and result.rows == 32
    assert result.path == folder.parent.parent / "features" / "toy" / "mobilenet_v2-random.h5"
    with h5py.File(result.path, "r") as h5:  # what a user sees with plain h5py
        assert h5["layers/avgpool"].shape == (32, 1280) and h5["layers/avgpool"].dtype == np.float32
        assert h5["layers/features.4:avg"].shape == (32, 32) and h5["layers/avgpool"].chunks is not None
        assert h5["labels"].dtype == np.int64 and set(h5["split"].asstr()[:]) == {"train", "val", "test"}
        assert h5["ids"].asstr()[0] == "test/blue/0.png"
        assert h5["layers/features.4:avg"].attrs["pooling"] == "avg"
        for key in ("class_names", "model", "weights", "weights_sha256", "transform", "pooling",
                    "dataset_fingerprint", "versions", "device", "precision", "images_per_s"):
            assert key in h5.attrs, key
        assert h5.attrs["weights"] == "random" and h5.attrs["precision"] == "fp32"


def test_same_request_is_a_cache_hit(folder, backbone):
    first = run(folder, backbone)
    mtime = first.path.stat().st_mtime_ns
    again = run(folder, backbone)
    assert again.status == "hit" and again.rows == 0 and first.path.stat().st_mtime_ns == mtime
    assert "nothing to do" in again.message


def test_changed_data_is_never_served_from_the_old_cache(folder, backbone):
    first = run(folder, backbone)
    write_image(folder / "train" / "red" / "new.png", color=(250, 0, 0))
    second = run(folder, backbone)
    assert second.status == "extracted" and "dataset_fingerprint" in second.message
    with FeatureCache(second.path) as cache:
        assert len(cache.ids) == 33 and "train/red/new.png" in set(cache.ids)
    assert first.path == second.path


def test_other_precision_is_another_cache(folder, backbone):
    run(folder, backbone, precision="fp32")
    assert run(folder, backbone, precision="bf16").status == "extracted"


def test_more_layers_extends_the_cache(folder, backbone):
    run(folder, backbone, ["penultimate"])
    result = run(folder, backbone, ["features.10:max"])
    assert result.status == "extracted" and result.layers == ["features.10:max", "avgpool"]
    assert run(folder, backbone, ["avgpool", "features.10:max"]).status == "hit"


def test_interrupted_extraction_resumes_to_identical_rows(folder, backbone):
    full = run(folder, backbone, ["penultimate"])
    with FeatureCache(full.path) as cache:
        expected = cache.features("avgpool")[0]
    full.path.unlink()
    # a crash after two batches: a .partial file with 10 of 32 rows
    run(folder, backbone, ["penultimate"])
    full.path.rename(partial_path(full.path))
    with h5py.File(partial_path(full.path), "r+") as h5:
        h5["layers/avgpool"].resize(10, axis=0)
        h5.attrs["n_done"], h5.attrs["complete"] = 10, False
    with pytest.raises(IncompleteCacheError, match="10 of 32.*resume"):
        FeatureCache(full.path)
    resumed = run(folder, backbone, ["penultimate"])
    assert resumed.status == "resumed" and resumed.rows == 22
    with FeatureCache(full.path) as cache:
        np.testing.assert_allclose(cache.features("avgpool")[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [{"batch_size": 1}, {"batch_size": 32, "num_workers": 2}])
def test_batch_size_and_workers_give_the_same_codes(folder, backbone, tmp_path, options):
    reference = run(folder, backbone)
    with FeatureCache(reference.path) as cache:
        expected = cache.features("avgpool")[0]
    reference.path.unlink()
    other = run(folder, backbone, **options)
    with FeatureCache(other.path) as cache:
        np.testing.assert_allclose(cache.features("avgpool")[0], expected, rtol=1e-4, atol=1e-5)


def test_bf16_codes_stay_close_to_fp32(folder, backbone):
    fp32 = run(folder, backbone)
    with FeatureCache(fp32.path) as cache:
        a = cache.features("avgpool")[0]
    fp32.path.unlink()
    bf16 = run(folder, backbone, precision="bf16")
    with FeatureCache(bf16.path) as cache:
        b = cache.features("avgpool")[0]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.mean() > 0.99


def test_precision_auto_is_recorded_resolved():
    import torch
    assert resolve_precision("auto", torch.device("cpu")) in ("bf16", "fp32")
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"
