"""Stage two: train one head on one cached layer, choosing on val and scoring test once.

    result = train_head("features/vehicles/mobilenet_v2-file-39a5f077.h5", "penultimate", "softmax")

Four steps, as CLIP_benchmark's linear probe: `load_codes` reads the layer's codes
per split; `fit_head` chooses C on val (heads.select_strength) and refits on
train+val; `score_head` looks at test, once; `record` saves the head as plain arrays
(HDF5, no pickle) with the cache's provenance, and its HeadResult as JSON beside it.
"""
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support)

from .checks import data_checks
from .errors import CacheError
from .heads import check_head, fit, select_strength
from .paths import head_paths
from .store import FeatureCache, write_head, write_json

SPLITS = ("train", "val", "test")
MISCLASSIFIED_LISTED = 200


@dataclass
class LayerCodes:
    """One cached layer: codes, labels, ids and split per row, and the cache's word on them."""
    cache: str
    layer: str
    X: np.ndarray        # float32 [N, D]
    y: np.ndarray        # int64 [N]
    ids: np.ndarray      # str [N]
    split: np.ndarray    # str [N]
    class_names: list
    attrs: dict          # the cache's attributes
    depth: int
    checks: dict         # checks.data_checks of the cache

    def rows(self, *splits):
        """Mask of the rows in `splits`, in cache order."""
        return np.isin(self.split, splits)

    def of(self, *splits):
        """(X, y) of the rows in `splits`, in cache order."""
        mask = self.rows(*splits)
        return self.X[mask], self.y[mask]


@dataclass
class FittedHead:
    model: object        # StandardScaler + head, fitted on train+val
    C: float
    grid: dict           # {C: val accuracy}
    select_seconds: float
    fit_seconds: float


def train_head(cache_file, layer, head, out_dir=None):
    """Select, refit and score one head on one cached layer; save head file + result JSON -> HeadResult."""
    check_head(head)
    codes = load_codes(cache_file, layer)
    fitted = fit_head(head, codes)
    return record(codes, head, fitted, score_head(fitted.model, codes), out_dir)


def load_codes(cache_file, layer):
    """The codes of `layer` (a cached name, `penultimate`, or a tap cached once) per split."""
    with FeatureCache(cache_file) as cache:
        layer = resolve_layer(cache, layer)
        X, y = cache.features(layer)
        codes = LayerCodes(str(cache_file), layer, X, y, cache.ids, cache.split, cache.class_names, cache.attrs,
                           cache.layer_attrs(layer).get("depth"), data_checks(cache))
    for s in SPLITS:
        if not codes.rows(s).any():
            raise CacheError(f"{cache_file}: the {s} split is empty; re-extract with a data set that has one")
    missing = set(range(len(codes.class_names))) - set(codes.of("train")[1])
    if missing:
        raise CacheError(f"{cache_file}: classes {[codes.class_names[i] for i in sorted(missing)]} have no train "
                         "images; add some or remove those classes")
    return codes


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


def fit_head(head, codes):
    """C chosen on val (fits on train only), then the head refit at that C on train+val."""
    t0 = time.perf_counter()
    C, grid = select_strength(head, *codes.of("train"), *codes.of("val"))
    t1 = time.perf_counter()
    model = fit(head, C, *codes.of("train", "val"))
    return FittedHead(model, C, grid, t1 - t0, time.perf_counter() - t1)


def score_head(model, codes):
    """The one look at test: predictions and the scores of them."""
    X_test, y_true = codes.of("test")
    y_pred = model.predict(X_test)
    labels = list(range(len(codes.class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    wrong = np.flatnonzero(y_pred != y_true)[:MISCLASSIFIED_LISTED]
    names, test_ids = codes.class_names, codes.ids[codes.rows("test")]
    return {"test_accuracy": float(accuracy_score(y_true, y_pred)),
            "test_balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
            "test_macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
            "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
            "per_class": [{"class": n, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                          for n, p, r, f, s in zip(names, precision, recall, f1, support)],
            "misclassified": [{"id": str(test_ids[i]), "true": names[y_true[i]],
                               "predicted": names[y_pred[i]]} for i in wrong]}


def record(codes, head, fitted, scores, out_dir=None):
    """Save the head file and its HeadResult JSON -> the HeadResult."""
    attrs, layer = codes.attrs, codes.layer
    head_file, result_file = head_paths(codes.cache, layer, head, out_dir)
    scaler, estimator = fitted.model[0], fitted.model[-1]
    write_head(head_file, coef=np.atleast_2d(estimator.coef_), intercept=np.atleast_1d(estimator.intercept_),
               scaler_mean=scaler.mean_, scaler_scale=scaler.scale_,
               attrs={"head": head, "layer": layer, "C": fitted.C, "class_names": codes.class_names,
                      "score": "margin" if head == "svm" else "probability",
                      "provenance": {k: v for k, v in attrs.items() if k != "settings"}})
    result = {
        "dataset": attrs["dataset"], "layout": attrs.get("layout"), "dataset_root": attrs.get("dataset_root"),
        "model": attrs["model"], "weights": attrs["weights"], "weights_sha256": attrs.get("weights_sha256", ""),
        "layer": layer, "head": head, "depth": codes.depth, "pooling": attrs.get("pooling", {}).get(layer, "none"),
        "precision": attrs.get("precision"), "dim": int(codes.X.shape[1]),
        **{f"n_{s}": int(codes.rows(s).sum()) for s in SPLITS},
        "C": fitted.C, "val_accuracy": fitted.grid[fitted.C],
        "grid": [{"C": c, "val_accuracy": fitted.grid[c]} for c in sorted(fitted.grid)], **scores,
        "class_names": codes.class_names, "select_seconds": round(fitted.select_seconds, 3),
        "fit_seconds": round(fitted.fit_seconds, 3), "data_checks": codes.checks, "cache": codes.cache,
        "head_file": str(head_file), "extract_images_per_s": attrs.get("images_per_s"),
        "created": datetime.now(timezone.utc).isoformat()}
    write_json(result_file, result)
    return result
