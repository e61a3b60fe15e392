"""Stage two's estimators: linear heads on cached codes, and the saved head as an estimator.

    HEADS (store.results): svm = LinearSVC, softmax = multinomial LogisticRegression,
                           linear = TorchLinearClassifier (nn.Linear, minibatches, GPU when present)
    C, grid = select_strength("softmax", X_train, y_train, X_val, y_val)
    model = fit("softmax", C, X, y)            # StandardScaler + the head, a scikit-learn pipeline
    head = LinearHead("features/.../x.softmax.h5").predict(X)

C, the inverse regularisation strength, means the same for every head (the torch head
uses LogisticRegression's objective). It is chosen on a coarse log grid, then refined
around the best, each fit on train and scored on val; ties go to the smaller C.
"""
import warnings
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
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
from .store import HEADS, read_head

COARSE_GRID = [10.0 ** k for k in range(-4, 3)]  # C = 1e-4 .. 1e2
FINE_STEPS = [10.0 ** -0.5, 10.0 ** 0.5]         # then the best C times these
SMALL_FIT = 20_000_000  # values in X below which BLAS threads cost more than they give, far more under load


class TorchLinearClassifier(ClassifierMixin, BaseEstimator):
    """Multinomial logistic regression as an nn.Linear trained with Adam in minibatches.

    Same objective as LogisticRegression(C): mean cross-entropy + ||W||^2 / (2 C n),
    so C means the same for every head; scales to caches that do not fit a solver.
    """

    def __init__(self, C=1.0, epochs=40, min_steps=400, batch_size=256, lr=1e-2, device="auto", random_state=0):
        self.C, self.epochs, self.min_steps, self.batch_size, self.lr = C, epochs, min_steps, batch_size, lr
        self.device, self.random_state = device, random_state

    def fit(self, X, y):
        if self.C <= 0:
            raise ValueError(f"The 'C' parameter must be > 0. Got {self.C} instead.")
        self.classes_, y_index = np.unique(y, return_inverse=True)
        device = resolve_device(self.device)
        generator = torch.Generator().manual_seed(self.random_state)
        X_t = torch.as_tensor(np.asarray(X, dtype=np.float32), device=device)  # [N, D]
        y_t = torch.as_tensor(y_index, device=device)                          # [N]
        n, d = X_t.shape
        layer = torch.nn.Linear(d, len(self.classes_)).to(device)
        torch.nn.init.zeros_(layer.weight)  # convex problem: start where sklearn starts
        torch.nn.init.zeros_(layer.bias)
        optimizer = torch.optim.Adam(layer.parameters(), lr=self.lr)
        batches = -(-n // self.batch_size)
        epochs = max(self.epochs, -(-self.min_steps // batches))  # small sets still get enough steps
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * batches)
        penalty = 1.0 / (2.0 * self.C * n)
        with _threads_for(device, self.batch_size * d * len(self.classes_)):
            for _ in range(epochs):
                for batch in torch.randperm(n, generator=generator).to(device).split(self.batch_size):
                    loss = torch.nn.functional.cross_entropy(layer(X_t[batch]), y_t[batch])
                    loss = loss + penalty * layer.weight.pow(2).sum()
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
        self.coef_ = layer.weight.detach().cpu().numpy()         # [K, D]
        self.intercept_ = layer.bias.detach().cpu().numpy()      # [K]
        return self

    def decision_function(self, X):
        return np.asarray(X, dtype=np.float32) @ self.coef_.T + self.intercept_

    def predict(self, X):
        return self.classes_[self.decision_function(X).argmax(axis=1)]

    def predict_proba(self, X):
        return softmax(self.decision_function(X))


def softmax(z):
    """Row-wise softmax of scores [N, K]."""
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


@contextmanager
def _threads_for(device, work_per_step):
    """One CPU thread for small steps: thread start-up costs more than the matmul, and
    with other processes on the cores (decode workers, a second job) it is many times slower."""
    if device.type != "cpu" or work_per_step > 5_000_000:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_head(name):
    """`name` if it is one of HEADS, else a PipelineError listing them."""
    if name not in HEADS:
        raise PipelineError(f"unknown head {name!r}; use one of {', '.join(sorted(HEADS))}")
    return name


def make_head(name, C):
    """A fresh estimator for head `name` at strength C (standardisation is added by `fit`)."""
    check_head(name)
    if name == "svm":
        return LinearSVC(C=C, max_iter=1000, random_state=0)  # large C rarely converges; more iterations only cost time
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


class LinearHead:
    """A saved head (store.head_file) as a fitted scikit-learn classifier, applied with numpy:
    decision_function(X) = ((X - mean_) / scale_) @ coef_.T + intercept_; `predict` gives class names."""

    def __init__(self, path):
        arrays, self.attrs = read_head(path)
        self.coef_, self.intercept_ = arrays["coef"], arrays["intercept"]
        self.mean_, self.scale_ = arrays["scaler_mean"], arrays["scaler_scale"]
        self.classes_ = np.array(self.attrs["class_names"], dtype=object)
        self.layer = self.attrs["layer"]
        self.provenance = self.attrs.get("provenance", {})  # the attributes of the cache it was trained on

    def decision_function(self, X):
        """[N, K] scores, or [N] for a binary scikit-learn head (positive: the second class)."""
        z = ((np.asarray(X, dtype=np.float64) - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_
        return z[:, 0] if z.shape[1] == 1 else z

    def predict(self, X):
        return self.classes_[self._scores(X).argmax(axis=1)]

    def margin(self, X):
        """Per row: the winner's score minus the runner-up's (how sure an svm head is)."""
        z = np.sort(self._scores(X), axis=1)
        return z[:, -1] - z[:, -2]

    def _probabilistic(self):
        return self.attrs.get("score") != "margin"

    @available_if(_probabilistic)
    def predict_proba(self, X):
        """[N, K] class probabilities (softmax and linear heads; an svm head has margins only)."""
        return softmax(self._scores(X))

    def _scores(self, X):
        """[N, K] scores for every class; a binary head's z as (-z/2, z/2): same argmax and softmax as sigmoid(z)."""
        z = self.decision_function(X)
        return np.stack([-z / 2, z / 2], axis=1) if z.ndim == 1 else z
