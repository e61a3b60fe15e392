"""Stage two: train one head on one cached layer, choosing on val and scoring test once.

    result = train_head("features/vehicles/mobilenet_v2-file-39a5f077.h5", "penultimate", "softmax")

Four steps, as CLIP_benchmark's linear probe: `load_codes` opens the layer (in memory
when it fits the memory budget, else streamed); `fit_head` chooses C on val and refits
on train+val (probe.py: torch, every C at once; or scikit-learn's exact estimators
with solver="sklearn"); `score_head` looks at test, once; `record` saves the head as
plain arrays (HDF5, no pickle) with the cache's provenance, and its HeadResult as
JSON beside it.
"""
import time
import warnings
from datetime import datetime, timezone

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             precision_recall_fscore_support)

from .datasets import training_problem
from .errors import CacheError, PipelineError
from .heads import LinearModel, check_head, fit, select_strength
from .layer_codes import CachedLayer, Scaler
from .paths import head_paths
from .probe import FittedHead, select_and_refit
from .store import codes_key, split_key, write_head, write_json

SPLITS = ("train", "val", "test")
SOLVERS = ("auto", "torch", "sklearn")
SKLEARN_AT_MOST = 4_000_000  # train rows x dims up to which "auto" takes LogisticRegression's exact fits (faster)
MISCLASSIFIED_LISTED = 200


def train_head(cache_file, layer, head, out_dir=None, solver="auto", memory_budget=None, progress=None):
    """Select, refit and score one head on one cached layer; save head file + result JSON -> HeadResult.
    `memory_budget` (bytes): above it the layer is streamed; `progress`: a tqdm bar over the rows fitted."""
    check_head(head)
    if solver not in SOLVERS:
        raise PipelineError(f"unknown solver {solver!r}; use one of {', '.join(SOLVERS)}")
    codes = load_codes(cache_file, layer, memory_budget)
    fitted = fit_head(head, codes, choose_solver(solver, head, codes), progress)
    t0 = time.perf_counter()
    scores = score_head(fitted.model, codes)
    return record(codes, head, fitted, {**scores, "test_seconds": round(time.perf_counter() - t0, 3)}, out_dir)


def load_codes(cache_file, layer, memory_budget=None):
    """The cached layer (layer_codes.CachedLayer), checked to have every split and every class in train."""
    codes = CachedLayer(cache_file, layer, memory_budget)
    for s in SPLITS:
        if not len(codes.rows(s)):
            raise CacheError(f"{cache_file}: the {s} split is empty; re-extract with a data set that has one")
    problem = training_problem(codes.labels, codes.split, codes.class_names)
    if problem:
        raise CacheError(f"{cache_file}: {problem}")
    return codes


def choose_solver(solver, head, codes):
    """`solver`, or for "auto": scikit-learn's LogisticRegression for a softmax head on a small layer in
    memory (its exact fits are faster there), else torch (LinearSVC's fits take ten times torch's at 3k rows)."""
    if solver != "auto":
        return solver
    small = codes.in_memory and len(codes.rows("train")) * codes.d <= SKLEARN_AT_MOST
    return "sklearn" if head == "softmax" and small else "torch"


def fit_head(head, codes, solver="torch", progress=None):
    """C chosen on val (fits on train only), then the head refit at that C on train+val -> FittedHead."""
    if solver == "torch":
        return select_and_refit(head, codes, progress)
    if not codes.in_memory:
        raise PipelineError(f"{codes.path}: layer {codes.layer} ({codes.n} x {codes.d}) is over the memory budget, "
                            "and scikit-learn fits in memory only; use the torch solver or a larger --memory-budget")
    train, val, both = codes.rows("train"), codes.rows("val"), codes.rows("train", "val")
    t0 = time.perf_counter()
    C, grid = select_strength(head, codes.X[train], codes.labels[train], codes.X[val], codes.labels[val])
    t1 = time.perf_counter()
    pipeline = fit(head, C, codes.X[both], codes.labels[both])
    model = LinearModel.from_pipeline(pipeline, codes.class_names, _score_kind(head))
    return FittedHead(model, C, grid, t1 - t0, time.perf_counter() - t1,
                      f"{_origin(pipeline[-1])}{type(pipeline[-1]).__name__}, one fit per C", len(train), False)


def _origin(estimator):
    return "scikit-learn " if type(estimator).__module__.startswith("sklearn") else "torch "


def score_head(model, codes):
    """The one look at test: predictions and the scores of them."""
    rows, predicted = [], []
    for block_rows, X in codes.blocks(("test",), Scaler(np.zeros(codes.d), np.ones(codes.d))):  # raw: the model standardises
        rows.append(block_rows)
        predicted.append(model.predict_index(X))
    rows, y_pred = np.concatenate(rows), np.concatenate(predicted)
    y_true, names = codes.labels[rows], codes.class_names
    labels = list(range(len(names)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    wrong = np.flatnonzero(y_pred != y_true)[:MISCLASSIFIED_LISTED]
    wrong_ids = codes.ids_of(rows[wrong])
    with warnings.catch_warnings():  # a class test does not have: balanced accuracy is over those it has
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        balanced = float(balanced_accuracy_score(y_true, y_pred))
    return {"test_accuracy": float(accuracy_score(y_true, y_pred)),
            "test_balanced_accuracy": balanced,
            "test_macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),  # test's or predicted
            "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
            "per_class": [{"class": n, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                          for n, p, r, f, s in zip(names, precision, recall, f1, support)],
            "misclassified": [{"id": id_, "true": names[y_true[i]], "predicted": names[y_pred[i]]}
                              for i, id_ in zip(wrong, wrong_ids)]}


def _score_kind(head):
    return "margin" if head == "svm" else "probability"


def record(codes, head, fitted, scores, out_dir=None):
    """Save the head file and its HeadResult JSON -> the HeadResult."""
    attrs, layer, model = codes.attrs, codes.layer, fitted.model
    head_file, result_file = head_paths(codes.path, layer, head, out_dir)
    write_head(head_file, coef=model.coef_, intercept=model.intercept_, scaler_mean=model.mean_,
               scaler_scale=model.scale_,
               attrs={"head": head, "layer": layer, "C": fitted.C, "class_names": codes.class_names,
                      "score": _score_kind(head), "solver": fitted.solver,
                      "provenance": {k: v for k, v in attrs.items() if k != "settings"}})
    result = {
        "dataset": attrs["dataset"], "layout": attrs.get("layout"), "dataset_root": attrs.get("dataset_root"),
        "model": attrs["model"], "weights": attrs["weights"], "weights_sha256": attrs.get("weights_sha256", ""),
        "layer": layer, "head": head, "depth": codes.depth, "pooling": attrs.get("pooling", {}).get(layer, "none"),
        "precision": attrs.get("precision"), "dim": int(codes.d),
        **{f"n_{s}": int(len(codes.rows(s))) for s in SPLITS},
        "C": fitted.C, "val_accuracy": fitted.grid[fitted.C],
        "grid": [{"C": c, "val_accuracy": fitted.grid[c]} for c in sorted(fitted.grid)], **scores,
        "class_names": codes.class_names, "solver": fitted.solver, "select_rows": fitted.select_rows,
        "streamed": fitted.streamed, "select_seconds": round(fitted.select_seconds, 3),
        "fit_seconds": round(fitted.fit_seconds, 3),
        "seconds": round(fitted.select_seconds + fitted.fit_seconds + scores["test_seconds"], 3),
        "data_checks": codes.checks,
        "cache": codes.path, "cache_key": codes_key(attrs.get("settings", {})),  # the data and codes it scored ...
        "split_key": split_key(codes.split),  # ... and which of them it was trained, chosen and tested on
        "head_file": str(head_file), "extract_images_per_s": attrs.get("images_per_s"),
        "created": datetime.now(timezone.utc).isoformat()}
    write_json(result_file, result)
    return result
