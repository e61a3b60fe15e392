"""Stage two: the estimator contract, selection on val only, the saved head's round trip."""
import json

import numpy as np
import pytest

from pipeline.errors import CacheError, PipelineError
from pipeline.heads import HEADS, LinearHead, TorchLinearClassifier, select_strength, train_head
from pipeline.store import CacheWriter


def blobs(n_per_class=60, dim=20, classes=3, seed=0, spread=1.5):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, spread, size=(classes, dim))
    X = np.concatenate([c + rng.normal(size=(n_per_class, dim)) for c in centers]).astype(np.float32)
    y = np.repeat(np.arange(classes), n_per_class)
    return X, y


def make_cache(path, X, y, split, class_names):
    writer = CacheWriter.create(path, ids=[f"img{i}.png" for i in range(len(y))], labels=y, split=split,
                                class_names=class_names, layer_dims={"fc7": (X.shape[1], {"pooling": "none"})},
                                attrs={"dataset": "toy", "model": "vgg16", "weights": "random",
                                       "settings": {"layers": ["fc7"]}, "penultimate": "fc7", "precision": "fp32"})
    writer.append({"fc7": X})
    writer.finish({})
    return path


@pytest.fixture
def cache(tmp_path):
    X, y = blobs()
    split = np.array(["train", "train", "train", "val", "test"] * (len(y) // 5))
    return make_cache(tmp_path / "toy" / "vgg16-random.h5", X, y, split, ["cat", "dog", "emu"])


def test_torch_linear_follows_the_estimator_contract():
    head = TorchLinearClassifier(C=0.5, epochs=3)
    assert head.get_params()["C"] == 0.5 and not hasattr(head, "coef_")
    X, y = blobs()
    assert head.fit(X, y) is head and head.coef_.shape == (3, 20) and list(head.classes_) == [0, 1, 2]
    assert (head.predict(X) == y).mean() > 0.9
    with pytest.raises(ValueError, match="The 'C' parameter must be > 0. Got -1 instead."):
        TorchLinearClassifier(C=-1).fit(X, y)


def test_torch_linear_regularisation_means_what_C_means():
    X, y = blobs(classes=2)
    strong = TorchLinearClassifier(C=1e-4, epochs=20).fit(X, y)
    weak = TorchLinearClassifier(C=1e2, epochs=20).fit(X, y)
    assert np.linalg.norm(strong.coef_) < np.linalg.norm(weak.coef_) / 5


@pytest.mark.parametrize("head", sorted(HEADS))
def test_train_head_round_trip(cache, head):
    result = train_head(cache, "penultimate", head)
    assert result["layer"] == "fc7" and result["head"] == head and result["dim"] == 20
    assert (result["n_train"], result["n_val"], result["n_test"]) == (108, 36, 36)
    assert result["test_accuracy"] > 0.9 and result["val_accuracy"] == max(g["val_accuracy"] for g in result["grid"])
    assert np.array(result["confusion_matrix"]).sum() == 36
    saved = json.loads(open(cache.parent / "heads" / f"vgg16-random.fc7.{head}.json").read())
    assert saved["test_accuracy"] == result["test_accuracy"]
    loaded = LinearHead(result["head_file"])
    X, y = blobs()
    pred, score = loaded.predict_with_scores(X[4::5])  # the test rows
    assert (pred == y[4::5]).mean() == pytest.approx(result["test_accuracy"])
    assert loaded.class_names == ["cat", "dog", "emu"] and loaded.provenance["model"] == "vgg16"
    assert ((score > 0) & (score <= 1)).all() if head != "svm" else (score >= 0).all()


def test_binary_heads_round_trip(tmp_path):
    X, y = blobs(classes=2, spread=0.4, seed=3)
    split = np.array(["train", "train", "train", "val", "test"] * (len(y) // 5))
    path = make_cache(tmp_path / "bin" / "vgg16-random.h5", X, y, split, ["no", "yes"])
    for head in ("svm", "softmax"):
        result = train_head(path, "fc7", head)
        pred, _ = LinearHead(result["head_file"]).predict_with_scores(X[split == "test"])
        assert (pred == y[split == "test"]).mean() == pytest.approx(result["test_accuracy"])


def test_strength_is_chosen_without_looking_at_test(tmp_path):
    """Scrambling the test labels changes the test score and nothing else."""
    X, y = blobs(spread=0.6)
    split = np.array(["train", "train", "train", "val", "test"] * (len(y) // 5))
    honest = train_head(make_cache(tmp_path / "a" / "m-random.h5", X, y, split, ["a", "b", "c"]), "fc7", "softmax")
    y_scrambled = y.copy()
    y_scrambled[split == "test"] = np.random.default_rng(1).permutation(y[split == "test"])
    scrambled = train_head(make_cache(tmp_path / "b" / "m-random.h5", X, y_scrambled, split, ["a", "b", "c"]),
                           "fc7", "softmax")
    assert scrambled["C"] == honest["C"] and scrambled["grid"] == honest["grid"]
    assert scrambled["test_accuracy"] < honest["test_accuracy"]


def test_select_prefers_stronger_regularisation_on_ties():
    X, y = blobs(spread=5)  # trivially separable: every C scores 1.0 on val
    C, scores = select_strength("softmax", X[::2], y[::2], X[1::2], y[1::2])
    assert set(scores.values()) == {1.0} and C == min(scores)


def test_train_head_errors(cache, tmp_path):
    with pytest.raises(CacheError, match=r"no layer 'conv3'.*fc7.*make extract LAYERS=conv3"):
        train_head(cache, "conv3", "svm")
    with pytest.raises(PipelineError, match="unknown head 'tree'"):
        train_head(cache, "fc7", "tree")
    X, y = blobs(classes=2)
    no_val = make_cache(tmp_path / "nv" / "m-random.h5", X, y, np.array(["train", "test"] * 60), ["a", "b"])
    with pytest.raises(CacheError, match="val split is empty"):
        train_head(no_val, "fc7", "svm")
