"""heads.py: the estimator contract, selection on val, and the saved head as a scikit-learn estimator."""
import numpy as np
import pytest

from sklearn.base import is_classifier
from sklearn.metrics import accuracy_score, get_scorer
from sklearn.utils.validation import check_is_fitted

from pipeline.errors import PipelineError
from pipeline.heads import LinearHead, TorchLinearClassifier, check_head, fit, make_head, select_strength
from pipeline.store import HEADS, write_head


def blobs(n_per_class=60, dim=20, classes=3, seed=0, spread=1.5):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, spread, size=(classes, dim))
    X = np.concatenate([c + rng.normal(size=(n_per_class, dim)) for c in centers]).astype(np.float32)
    y = np.repeat(np.arange(classes), n_per_class)
    return X, y


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


def test_every_head_is_made_and_unknown_heads_name_the_choices():
    assert {name: type(make_head(name, 1.0)).__name__ for name in HEADS} == {
        "svm": "LinearSVC", "softmax": "LogisticRegression", "linear": "TorchLinearClassifier"}
    with pytest.raises(PipelineError, match="unknown head 'tree'; use one of linear, softmax, svm"):
        check_head("tree")


def test_select_prefers_stronger_regularisation_on_ties():
    X, y = blobs(spread=5)  # trivially separable: every C scores 1.0 on val
    C, scores = select_strength("softmax", X[::2], y[::2], X[1::2], y[1::2])
    assert set(scores.values()) == {1.0} and C == min(scores)
    assert len(scores) == 9  # the coarse grid of 7, then two refinements around the best


def test_select_refines_around_the_best_coarse_C():
    X, y = blobs(spread=0.5, seed=2)
    C, scores = select_strength("softmax", X[::2], y[::2], X[1::2], y[1::2])
    coarse = [10.0 ** k for k in range(-4, 3)]
    best_coarse = max(coarse, key=lambda c: (scores[c], -c))
    assert sorted(set(scores) - set(coarse)) == pytest.approx([best_coarse * 10 ** -0.5, best_coarse * 10 ** 0.5])
    assert scores[C] == max(scores.values())


def saved(tmp_path, name, X, y, class_names):
    """Fit head `name` with its scaler, save it as train.record does, load it back -> (model, LinearHead)."""
    model = fit(name, 1.0, X, y)
    scaler, estimator = model[0], model[-1]
    path = tmp_path / f"{name}.h5"
    write_head(path, coef=np.atleast_2d(estimator.coef_), intercept=np.atleast_1d(estimator.intercept_),
               scaler_mean=scaler.mean_, scaler_scale=scaler.scale_,
               attrs={"head": name, "layer": "fc7", "class_names": class_names,
                      "score": "margin" if name == "svm" else "probability", "provenance": {"model": "vgg16"}})
    return model, LinearHead(path)


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("classes", [2, 3])
def test_a_saved_head_predicts_as_the_fitted_one(tmp_path, name, classes):
    X, y = blobs(classes=classes, spread=0.8, seed=classes)
    names = ["cat", "dog", "emu"][:classes]
    model, head = saved(tmp_path, name, X, y, names)
    assert list(head.classes_) == names and head.layer == "fc7" and head.provenance == {"model": "vgg16"}
    assert head.coef_.shape == ((1, 20) if classes == 2 else (classes, 20))  # one output for two classes
    np.testing.assert_allclose(head.decision_function(X), model.decision_function(X), rtol=1e-4, atol=1e-4)
    assert list(head.predict(X)) == [names[k] for k in model.predict(X)]
    if name == "svm":
        assert not hasattr(head, "predict_proba") and (head.margin(X) >= 0).all()
    else:
        np.testing.assert_allclose(head.predict_proba(X), model.predict_proba(X), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_a_saved_head_is_a_fitted_scikit_learn_classifier(tmp_path, name):
    X, y = blobs(classes=2, spread=0.8, seed=2)
    names = np.array(["cat", "dog"], dtype=object)
    _, head = saved(tmp_path, name, X, y, list(names))
    assert is_classifier(head) and head.score(X, names[y]) == accuracy_score(names[y], head.predict(X))
    check_is_fitted(head)
    auc = get_scorer("roc_auc")(head, X, names[y])  # from predict_proba or decision_function
    assert 0.9 < auc <= 1.0
    with pytest.raises(TypeError, match="fitted already"):
        head.fit(X, y)
