"""Stage two's JSON files: one result per trained head, one record per layer sweep.

    FEATURES_DIR/<dataset>/heads/<cache stem>.<layer>.<head>.json   a HeadResult
    FEATURES_DIR/<dataset>/<cache stem>.sweep-<head>.json           a SweepRecord

`HeadResult` is the one schema: `train.train_head` writes it, `report` reads it.
Keys of its required part must be there with their types for a file to be reported.
"""
import json
import math
from pathlib import Path
from typing import TypedDict, get_type_hints

from .cache import read_cache_identity

HEADS = {"svm": "linear SVM, LinearSVC's objective (squared hinge, one-vs-rest); torch L-BFGS or sklearn",
         "softmax": "multinomial logistic regression, LogisticRegression's objective; torch L-BFGS or sklearn",
         "linear": "softmax's objective as a torch nn.Linear, minibatch Adam (GPU when present)"}


class _Provenance(TypedDict, total=False):
    """Where a result came from and what else it says; files from older versions may lack these."""
    layout: str
    dataset_root: str      # the data set's folder (or sklearn:digits), for thumbnails
    weights_sha256: str
    depth: int             # the layer's position in the forward graph
    pooling: str
    precision: str
    grid: list             # [{"C", "val_accuracy"}] of every C tried
    solver: str            # what trained the head, in words
    select_rows: int       # train rows C was chosen on (fewer than n_train: a stratified subsample)
    streamed: bool         # the layer was read from disk in blocks, not held in memory
    cache_key: str         # store.codes_key of the cache it was trained on: another one there now -> stale
    split_key: str         # store.split_key of that cache's rows: other splits there now -> stale
    select_seconds: float
    fit_seconds: float
    test_seconds: float
    seconds: float         # the whole protocol: selection, refit, test
    misclassified: list    # [{"id", "true", "predicted"}] of test images, at most 200
    data_checks: dict      # checks.data_checks of the cache
    cache: str
    head_file: str
    extract_images_per_s: float
    created: str


class HeadResult(_Provenance):
    """One trained head: what it was trained on, the C chosen on val, and its one test score."""
    dataset: str
    model: str
    weights: str           # "IMAGENET1K_V1", "random" or "file"
    layer: str
    head: str              # a key of HEADS
    dim: int
    n_train: int
    n_val: int
    n_test: int
    C: float
    val_accuracy: float
    test_accuracy: float
    test_balanced_accuracy: float
    test_macro_f1: float
    confusion_matrix: list  # [K][K] counts, rows: true class
    class_names: list
    per_class: list         # [{"class", "precision", "recall", "f1", "support"}]


class SweepRecord(TypedDict, total=False):
    """A layer sweep's choice for one cache and head, made on val accuracy only."""
    cache: str
    head: str
    pooling: str
    chosen: str
    criterion: str
    layers: list            # [{"layer", "dim", "C", "val_accuracy", "test_accuracy"}]
    cache_key: str          # the cache's codes_key and split_key when it chose (records from 2026-12-04 on)
    split_key: str


_REQUIRED = {key: kind for key, kind in get_type_hints(HeadResult).items() if key in HeadResult.__required_keys__}


def result_problem(result):
    """Why a parsed result cannot be reported, or None."""
    if not isinstance(result, dict):
        return "not a JSON object"
    missing = [key for key in _REQUIRED if key not in result]
    if missing:
        return f"lacks {', '.join(missing)}"
    for key, kind in _REQUIRED.items():
        value = result[key]
        number = (int, float) if kind is float else kind
        if isinstance(value, bool) or not isinstance(value, number) or (kind is float and not math.isfinite(value)):
            return f"{key} is not a {kind.__name__}"
    k = len(result["class_names"])
    if len(result["confusion_matrix"]) != k or not all(isinstance(r, list) and len(r) == k
                                                       for r in result["confusion_matrix"]):
        return f"confusion_matrix is not {k}x{k}"
    if not all(isinstance(c, dict) and {"class", "precision", "recall", "f1", "support"} <= c.keys()
               for c in result["per_class"]):
        return "per_class entries lack class/precision/recall/f1/support"
    return None


def read_result(path):
    """A result file -> HeadResult; ValueError saying why it cannot be used."""
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError covers bad JSON and bad UTF-8
        raise ValueError(f"not readable JSON ({e})") from None
    problem = result_problem(result)
    if problem:
        raise ValueError(problem)
    return result


def write_json(path, record):
    """Write a HeadResult or SweepRecord under a temporary name, then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_sweep_record(path):
    """A sweep record -> SweepRecord; ValueError if it is unreadable or lacks its choice."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"not readable JSON ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("chosen"), str):
        raise ValueError("lacks the chosen layer")
    return record


def cache_identity_in(folder, cache, identity=read_cache_identity):
    """read_cache_identity of the cache a result or record names, looked for in `folder` (where it lies when
    FEATURES_DIR was moved or spelled otherwise), then where `cache` says. `identity`: read_cache_identity,
    or a memo of it."""
    name = Path(str(cache))
    return identity(Path(folder) / name.name) or identity(name)


def sweep_made_before_cache(record, record_path, identity=read_cache_identity):
    """Whether the cache a sweep chose on was made again since, of other data, splits or codes: its choice
    is of something else. The cache is looked for beside the record (cache_identity_in); records written
    before they kept the cache's keys, and caches not found, are taken as current."""
    if not isinstance(record.get("cache_key"), str):
        return False
    found = cache_identity_in(Path(record_path).parent, record.get("cache"), identity)
    return found is not None and (found[1], found[2]) != (record["cache_key"], record.get("split_key"))


def sweeps_choice(records):
    """The layer chosen among the sweeps of one cache and head (one record per pooling), on val only: the
    best val accuracy of their chosen layers; ties: the deeper, then the first record."""
    best_score, best = None, None
    for record in records:
        order = {row.get("layer"): (row.get("val_accuracy", -1.0), k) for k, row in enumerate(record.get("layers", []))}
        score = order.get(record["chosen"], (-1.0, -1))
        if best_score is None or score > best_score:
            best_score, best = score, record["chosen"]
    return best
