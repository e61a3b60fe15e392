"""probe.py: every C at once, chosen on val only, on a subsample when train is large, streamed or not."""
import numpy as np
import pytest

from pipeline import probe
from pipeline.layer_codes import CachedLayer
from pipeline.train import train_head
from test_heads import blobs
from test_train import FIVE, make_cache


def cache_of(tmp_path, name, X, y, split=None):
    split = np.array(FIVE * (len(y) // 5)) if split is None else split
    return make_cache(tmp_path / name / "m-random.h5", X, y, split, ["a", "b", "c"])


@pytest.fixture(scope="module")
def overlapping(tmp_path_factory):
    """Three overlapping classes (val accuracy varies with C), with their split."""
    X, y = blobs(n_per_class=100, dim=16, spread=0.35, seed=7)
    return X, y, np.array(FIVE * (len(y) // 5))


@pytest.mark.parametrize("head", ["softmax", "svm", "linear"])
def test_selection_never_sees_test_rows(tmp_path, overlapping, head):
    """Replacing every test row's codes and labels changes the test score and nothing else."""
    X, y, split = overlapping
    honest = train_head(cache_of(tmp_path, "a", X, y), "fc7", head, solver="torch")
    X2, y2, test = X.copy(), y.copy(), split == "test"
    X2[test] = np.random.default_rng(3).normal(size=X2[test].shape) * 5
    y2[test] = np.random.default_rng(4).permutation(y2[test])
    scrambled = train_head(cache_of(tmp_path, "b", X2, y2), "fc7", head, solver="torch")
    assert scrambled["C"] == honest["C"] and scrambled["grid"] == honest["grid"]
    assert scrambled["test_accuracy"] < honest["test_accuracy"]


def test_the_grid_fits_on_train_and_the_refit_on_train_and_val(tmp_path, overlapping, monkeypatch):
    X, y, _ = overlapping
    real, seen = probe.fit_full_batch, []
    monkeypatch.setattr(probe, "fit_full_batch", lambda X, y, k, Cs, *a, **kw: seen.append((len(y), len(Cs))) or
                        real(X, y, k, Cs, *a, **kw))
    result = train_head(cache_of(tmp_path, "g", X, y), "fc7", "svm", solver="torch")
    assert seen == [(180, 7), (180, 2), (240, 1)]  # the coarse grid, its refinement, the refit
    assert len(result["grid"]) == 9 and result["n_train"] == 180


@pytest.mark.parametrize("head", ["softmax", "svm", "linear"])
def test_streaming_gives_what_memory_gives(tmp_path, overlapping, head):
    X, y, _ = overlapping
    cache = cache_of(tmp_path, "s", X, y)
    in_memory = train_head(cache, "fc7", head, out_dir=tmp_path / "m", solver="torch")
    streamed = train_head(cache, "fc7", head, out_dir=tmp_path / "d", memory_budget=0)  # auto: torch when streamed
    assert (in_memory["streamed"], streamed["streamed"]) == (False, True)
    assert "streamed" in streamed["solver"] or head == "linear" and streamed["streamed"]
    assert streamed["C"] == in_memory["C"] and streamed["grid"] == in_memory["grid"]  # selection: the same rows
    assert abs(streamed["test_accuracy"] - in_memory["test_accuracy"]) <= 0.05


def test_a_large_train_split_chooses_C_on_a_stratified_subsample(tmp_path, overlapping, monkeypatch):
    X, y, split = overlapping
    monkeypatch.setattr(probe, "SELECT_ROWS", 60)
    codes = CachedLayer(cache_of(tmp_path, "sub", X, y), "fc7")
    rows = probe.selection_rows(codes, limit=60)
    assert len(rows) == 60 and set(split[rows]) == {"train"} and list(rows) == sorted(rows)
    assert np.bincount(y[rows]).tolist() == [20, 20, 20]  # the train split's class shares
    result = train_head(codes.path, "fc7", "softmax", solver="torch")
    assert result["select_rows"] == 60 < result["n_train"] and "stratified subsample" in result["solver"]


def test_torch_and_scikit_learn_choose_alike(tmp_path, overlapping):
    X, y, _ = overlapping
    cache = cache_of(tmp_path, "t", X, y)
    for head in ("softmax", "svm"):
        torch_result = train_head(cache, "fc7", head, out_dir=tmp_path / "torch", solver="torch")
        exact = train_head(cache, "fc7", head, out_dir=tmp_path / "sk", solver="sklearn")
        assert "torch" in torch_result["solver"] and "scikit-learn" in exact["solver"]
        assert abs(np.log10(torch_result["C"]) - np.log10(exact["C"])) <= 1.0
        assert abs(torch_result["test_accuracy"] - exact["test_accuracy"]) <= 0.03
