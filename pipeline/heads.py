"""Stage two: linear heads on cached codes, chosen on val, scored on test once.

    HEADS = {"svm": LinearSVC, "softmax": multinomial LogisticRegression,
             "linear": TorchLinearClassifier (nn.Linear, minibatches, GPU when present)}
    result = train_head(cache_file, "features.17:avg", "softmax", out_dir)

The protocol (as CLIP_benchmark's linear probe): features standardised; the
inverse regularisation strength C swept on a coarse log grid then refined around
the best, each fit on train and scored on val; the best C refit on train+val;
test scored once. The head is saved as plain arrays (HDF5, no pickle) with the
cache's provenance, next to a result JSON.
"""
import json
import time
from contextlib import contextmanager, nullcontext
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support)
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from threadpoolctl import threadpool_limits

from .checks import data_checks
from .errors import CacheError, PipelineError
from .store import FeatureCache, read_head, write_head

COARSE_GRID = [10.0 ** k for k in range(-4, 3)]  # C = 1e-4 .. 1e2
FINE_STEPS = [10.0 ** -0.5, 10.0 ** 0.5]         # then the best C times these


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
        device = torch.device("cuda" if self.device == "auto" and torch.cuda.is_available()
                              else "cpu" if self.device == "auto" else self.device)
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


def make_head(name, C):
    """A fresh estimator for head `name` at strength C (standardisation is added by the caller)."""
    if name == "svm":
        return LinearSVC(C=C, max_iter=1000, random_state=0)  # large C rarely converges; more iterations only cost time
    if name == "softmax":
        return LogisticRegression(C=C, max_iter=2000)
    if name == "linear":
        return TorchLinearClassifier(C=C)
    raise PipelineError(f"unknown head {name!r}; use one of {', '.join(sorted(HEADS))}")


HEADS = {"svm": "scikit-learn LinearSVC (hinge loss, one-vs-rest)",
         "softmax": "scikit-learn LogisticRegression (multinomial, lbfgs)",
         "linear": "torch nn.Linear, cross-entropy, Adam minibatches (GPU when present)"}


def fit_scored(name, C, X_fit, y_fit, X_eval, y_eval):
    """Fit standardiser + head on one set, return (model, accuracy on the other)."""
    model = make_pipeline(StandardScaler(), make_head(name, C))
    small = np.asarray(X_fit).size < 20_000_000  # BLAS threads cost more than they give here, and far more under load
    with warnings.catch_warnings(), threadpool_limits(1) if small else nullcontext():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X_fit, y_fit)
    return model, accuracy_score(y_eval, model.predict(X_eval))


def select_strength(name, X_train, y_train, X_val, y_val):
    """C with the best val accuracy: coarse log grid, then refined; ties go to the smaller C."""
    scores = {}
    for C in COARSE_GRID:
        scores[C] = fit_scored(name, C, X_train, y_train, X_val, y_val)[1]
    best = max(scores, key=lambda c: (scores[c], -c))
    for C in (best * step for step in FINE_STEPS):
        scores[C] = fit_scored(name, C, X_train, y_train, X_val, y_val)[1]
    best = max(scores, key=lambda c: (scores[c], -c))
    return best, scores


def evaluate(y_true, y_pred, n_classes):
    labels = list(range(n_classes))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
            "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
            "per_class": [{"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                          for p, r, f, s in zip(precision, recall, f1, support)]}


def head_paths(out_dir, cache_path, layer, head):
    stem = f"{Path(cache_path).stem}.{layer.replace(':', '-')}.{head}"
    return Path(out_dir) / f"{stem}.h5", Path(out_dir) / f"{stem}.json"


def train_head(cache_file, layer, head, out_dir=None):
    """Select, refit and score one head on one cached layer; save head + result JSON."""
    if head not in HEADS:
        raise PipelineError(f"unknown head {head!r}; use one of {', '.join(sorted(HEADS))}")
    cache_file = Path(cache_file)
    out_dir = Path(out_dir) if out_dir else cache_file.parent / "heads"
    with FeatureCache(cache_file) as cache:
        layer = resolve_layer(cache, layer)
        X, y = cache.features(layer)
        split, ids, attrs, class_names = cache.split, cache.ids, cache.attrs, cache.class_names
        depth = cache.layer_attrs(layer).get("depth")
        checks = data_checks(cache)
    parts = {s: split == s for s in ("train", "val", "test")}
    for s, mask in parts.items():
        if not mask.any():
            raise CacheError(f"{cache_file}: the {s} split is empty; re-extract with a data set that has one")
    missing = set(range(len(class_names))) - set(y[parts["train"]])
    if missing:
        raise CacheError(f"{cache_file}: classes {[class_names[i] for i in sorted(missing)]} have no train "
                         "images; add some or remove those classes")
    t0 = time.perf_counter()
    C, grid = select_strength(head, X[parts["train"]], y[parts["train"]], X[parts["val"]], y[parts["val"]])
    select_seconds = time.perf_counter() - t0
    fit_on = parts["train"] | parts["val"]
    t0 = time.perf_counter()
    model, _ = fit_scored(head, C, X[fit_on], y[fit_on], X[:1], y[:1])
    fit_seconds = time.perf_counter() - t0
    y_pred = model.predict(X[parts["test"]])  # the one look at test
    scores = evaluate(y[parts["test"]], y_pred, len(class_names))
    test_ids = ids[parts["test"]]
    wrong = np.flatnonzero(y_pred != y[parts["test"]])
    head_file, result_file = head_paths(out_dir, cache_file, layer, head)
    result = {
        "dataset": attrs["dataset"], "layout": attrs.get("layout"), "dataset_root": attrs.get("dataset_root"),
        "model": attrs["model"], "weights": attrs["weights"],
        "weights_sha256": attrs.get("weights_sha256", ""), "layer": layer, "head": head,
        "depth": depth, "pooling": attrs.get("pooling", {}).get(layer, "none"), "precision": attrs.get("precision"),
        "dim": int(X.shape[1]), "n_train": int(parts["train"].sum()), "n_val": int(parts["val"].sum()),
        "n_test": int(parts["test"].sum()), "C": C, "val_accuracy": grid[C],
        "grid": [{"C": c, "val_accuracy": grid[c]} for c in sorted(grid)],
        "test_accuracy": scores["accuracy"], "test_balanced_accuracy": scores["balanced_accuracy"],
        "test_macro_f1": scores["macro_f1"], "confusion_matrix": scores["confusion_matrix"],
        "per_class": [{"class": n, **m} for n, m in zip(class_names, scores["per_class"])],
        "class_names": class_names, "select_seconds": round(select_seconds, 3),
        "fit_seconds": round(fit_seconds, 3),
        "misclassified": [{"id": str(test_ids[i]), "true": class_names[y[parts["test"]][i]],
                           "predicted": class_names[y_pred[i]]} for i in wrong[:200]],
        "data_checks": checks, "cache": str(cache_file), "head_file": str(head_file),
        "extract_images_per_s": attrs.get("images_per_s"), "created": datetime.now(timezone.utc).isoformat(),
    }
    scaler, estimator = model[0], model[-1]
    provenance = {k: v for k, v in attrs.items() if k not in ("settings",)}
    write_head(head_file, coef=np.atleast_2d(estimator.coef_), intercept=np.atleast_1d(estimator.intercept_),
               scaler_mean=scaler.mean_, scaler_scale=scaler.scale_,
               attrs={"head": head, "layer": layer, "C": C, "class_names": class_names,
                      "score": "margin" if head == "svm" else "probability", "provenance": provenance})
    if result_file.exists():  # a sweep's choice stays with its layer when the head is retrained
        try:
            result["chosen"] = bool(json.loads(result_file.read_text())["chosen"])
        except (ValueError, KeyError, TypeError):
            pass
    result_file.write_text(json.dumps(result, indent=2))
    return result


def resolve_layer(cache, layer):
    """A cache layer by exact name, `penultimate`, or a tap whose one pooled version is cached."""
    if layer in cache.layers:
        return layer
    if layer == "penultimate" and cache.attrs.get("penultimate") in cache.layers:
        return cache.attrs["penultimate"]
    pooled = [name for name in cache.layers if name.split(":")[0] == layer]
    if len(pooled) == 1:
        return pooled[0]
    raise CacheError(f"{cache.path}: no layer {layer!r}; it has {', '.join(cache.layers)} "
                     f"(extract it with `make extract LAYERS={layer}`)")


class LinearHead:
    """A saved head, applied with numpy: scores = ((x - mean) / scale) @ coef.T + intercept."""

    def __init__(self, path):
        arrays, self.attrs = read_head(path)
        self.coef, self.intercept = arrays["coef"], arrays["intercept"]
        self.mean, self.scale = arrays["scaler_mean"], arrays["scaler_scale"]
        self.class_names = list(self.attrs["class_names"])
        self.layer = self.attrs["layer"]
        self.provenance = self.attrs.get("provenance", {})

    def decision_function(self, X):
        return ((np.asarray(X, dtype=np.float64) - self.mean) / self.scale) @ self.coef.T + self.intercept

    def predict_with_scores(self, X):
        """-> (class index per row, score: probability, or margin for svm)."""
        z = self.decision_function(X)  # [N, K], or [N, 1] for a binary sklearn head
        if z.shape[1] == 1:
            z = np.hstack([-z / 2, z / 2])  # binary: same argmax and softmax as sigmoid(z)
        pred = z.argmax(axis=1)
        if self.attrs.get("score") == "margin":  # distance of the winner from the runner-up
            top2 = np.sort(z, axis=1)[:, -2:]
            return pred, top2[:, 1] - top2[:, 0]
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        return pred, p.max(axis=1)
