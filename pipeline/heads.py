"""Stage two's estimators: linear heads on cached codes, and the saved head as an estimator.

    HEADS (store.results): svm, softmax, linear; trained by probe.py (torch, every C at once)
    or, with solver="sklearn", by scikit-learn's exact estimators here:
    C, grid = select_strength("softmax", X_train, y_train, X_val, y_val)
    model = fit("softmax", C, X, y)            # StandardScaler + LogisticRegression, a pipeline
    head = LinearHead("features/.../x.softmax.h5").predict(X)   # a saved head, any solver

C, the inverse regularisation strength, means the same for every head (the torch head
uses LogisticRegression's objective). It is chosen on a coarse log grid, then refined
around the best, each fit on train and scored on val; ties go to the smaller C.
"""
import warnings
from contextlib import nullcontext

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from sklearn.utils.metaestimators import available_if
from threadpoolctl import threadpool_limits

from .errors import PipelineError
from .hardware import resolve_device
from .linear import epochs_for, fit_minibatch, shuffled
from .store import HEADS, read_head

COARSE_GRID = [10.0 ** k for k in range(-4, 3)]  # C = 1e-4 .. 1e2
FINE_STEPS = [10.0 ** -0.5, 10.0 ** 0.5]         # then the best C times these
SMALL_FIT = 20_000_000  # values in X below which BLAS threads cost more than they give, far more under load


class TorchLinearClassifier(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression as an nn.Linear trained with Adam in minibatches (linear.py).

    Same objective as LogisticRegression(C): mean cross-entropy + ||W||^2 / (2 C n),
    so C means the same for every head.
    """

    def __init__(self, C=1.0, epochs=40, min_steps=400, batch_size=256, lr=1e-2, device="auto", random_state=0):
        self.C, self.epochs, self.min_steps, self.batch_size, self.lr = C, epochs, min_steps, batch_size, lr
        self.device, self.random_state = device, random_state

    def fit(self, X, y):
        if self.C <= 0:
            raise ValueError(f"The 'C' parameter must be > 0. Got {self.C} instead.")
        self.classes_, y_index = np.unique(y, return_inverse=True)
        X = np.asarray(X, dtype=np.float32)  # [N, D]
        epochs = epochs_for(len(X), self.batch_size, self.epochs, self.min_steps)
        fit = fit_minibatch(shuffled(X, y_index, self.batch_size, self.random_state), len(X), X.shape[1],
                            len(self.classes_), [self.C], "softmax", epochs, self.lr, resolve_device(self.device))
        self.coef_, self.intercept_ = fit.pick(self.C)  # [K, D], [K]
        return self

    def decision_function(self, X):
        """[N, K] scores, or [N] for two classes (positive: the second), as scikit-learn's heads."""
        z = np.asarray(X, dtype=np.float32) @ self.coef_.T + self.intercept_
        return z[:, 0] if z.shape[1] == 1 else z

    def predict(self, X):
        return self.classes_[every_class(self.decision_function(X)).argmax(axis=1)]

    def predict_proba(self, X):
        return softmax(every_class(self.decision_function(X)))


def softmax(z):
    """Row-wise softmax of scores [N, K]."""
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def every_class(z):
    """Scores [N, K] of every class; a binary head's z [N] as (-z/2, z/2): same argmax and softmax as sigmoid(z)."""
    return np.stack([-z / 2, z / 2], axis=1) if z.ndim == 1 else z


def check_head(name):
    """`name` if it is one of HEADS, else a PipelineError listing them."""
    if name not in HEADS:
        raise PipelineError(f"unknown head {name!r}; use one of {', '.join(sorted(HEADS))}")
    return name


def make_head(name, C):
    """A fresh estimator for head `name` at strength C (standardisation is added by `fit`)."""
    check_head(name)
    if name == "svm":
        # dual: coordinate descent, far faster than the primal solver at large C (which "auto" picks when N > D)
        return LinearSVC(C=C, dual=True, max_iter=1000, random_state=0)
    if name == "softmax":
        return LogisticRegression(C=C, max_iter=2000)
    return TorchLinearClassifier(C=C)


def fit(name, C, X, y):
    """StandardScaler + head `name` at strength C, fitted on (X, y)."""
    model = make_pipeline(StandardScaler(), make_head(name, C))
    small = np.asarray(X).size < SMALL_FIT
    with warnings.catch_warnings(), threadpool_limits(1) if small else nullcontext():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X, y)
    return model


def select_strength(name, X_train, y_train, X_val, y_val):
    """C with the best val accuracy -> (C, {C: val accuracy}): coarse log grid, then refined."""
    scores = {}
    for grid in (COARSE_GRID, FINE_STEPS):
        best = max(scores, key=lambda c: (scores[c], -c)) if scores else 1.0
        for C in (best * step for step in grid):
            scores[C] = accuracy_score(y_val, fit(name, C, X_train, y_train).predict(X_val))
    return max(scores, key=lambda c: (scores[c], -c)), scores


class LinearModel(ClassifierMixin, BaseEstimator):
    """A linear head on raw codes, applied with numpy, as a fitted scikit-learn classifier:
    decision_function(X) = ((X - mean_) / scale_) @ coef_.T + intercept_; `predict` gives class names,
    `score(X, y)` the accuracy. `score_kind`: "probability", or "margin" for an svm head."""

    def __init__(self, coef, intercept, mean, scale, class_names, score_kind="probability"):
        self.coef_, self.intercept_ = np.asarray(coef), np.asarray(intercept)
        self.mean_, self.scale_ = np.asarray(mean), np.asarray(scale)
        self.classes_ = np.array(class_names, dtype=object)
        self.n_features_in_ = self.coef_.shape[1]
        self.score_kind = score_kind

    def get_params(self, deep=True):
        return {}  # fitted from its arrays, not from parameters: nothing for clone or a search to set

    def fit(self, X, y):
        raise TypeError(f"{type(self).__name__} is fitted already; train a head with make train-head")

    @classmethod
    def from_pipeline(cls, pipeline, class_names, score_kind):
        """A fitted make_pipeline(StandardScaler(), estimator) of class indices 0..K-1."""
        scaler, estimator = pipeline[0], pipeline[-1]
        return cls(np.atleast_2d(estimator.coef_), np.atleast_1d(estimator.intercept_), scaler.mean_, scaler.scale_,
                   class_names, score_kind)

    def decision_function(self, X):
        """[N, K] scores, or [N] for a binary scikit-learn head (positive: the second class)."""
        z = ((np.asarray(X, dtype=np.float64) - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_
        return z[:, 0] if z.shape[1] == 1 else z

    def predict_index(self, X):
        """Per row: the index of the predicted class in classes_."""
        return self._scores(X).argmax(axis=1)

    def predict(self, X):
        return self.classes_[self.predict_index(X)]

    def margin(self, X):
        """Per row: the winner's score minus the runner-up's (how sure an svm head is)."""
        z = np.sort(self._scores(X), axis=1)
        return z[:, -1] - z[:, -2]

    def _probabilistic(self):
        return self.score_kind != "margin"

    @available_if(_probabilistic)
    def predict_proba(self, X):
        """[N, K] class probabilities (softmax and linear heads; an svm head has margins only)."""
        return softmax(self._scores(X))

    def _scores(self, X):
        return every_class(self.decision_function(X))


class LinearHead(LinearModel):
    """A saved head file (store.head_file) as a fitted classifier, with its layer and provenance."""

    def __init__(self, path):
        arrays, self.attrs = read_head(path)
        super().__init__(arrays["coef"], arrays["intercept"], arrays["scaler_mean"], arrays["scaler_scale"],
                         self.attrs["class_names"], self.attrs.get("score", "probability"))
        self.layer = self.attrs["layer"]
        self.provenance = self.attrs.get("provenance", {})  # the attributes of the cache it was trained on
