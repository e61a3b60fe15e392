"""The cache key and the plan of one extract call: pure decisions, no torch.

    key = cache_key(table, backbone, precision)      # everything that changes the cached values
    plan = plan_extraction(path, table, layers, key, backbone.resolve, update=False)
    plan.todo                                         # None: the cache is there; else the rows to compute

The same request finds its cache and does nothing; another model setting rebuilds
it; more layers re-extract once with all of them; a changed data set stops with
what changed (`DataChange`), unless `update` computes only new and changed images
and copies the rest (old images keep their split), or `rebuild` starts over.
"""
from dataclasses import dataclass

import numpy as np

from .datasets import content_sha256
from .errors import StaleCacheError
from .images import DRAFT_FACTOR
from .store import FeatureCache, Reuse, read_cache_settings, read_partial_settings, remove_partial

__all__ = ["PRECISIONS", "DATA_KEYS", "Plan", "DataChange", "plan_extraction", "cache_key", "decode_setting",
           "draft_size"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class Plan:
    """What one extract call does: which rows it computes (None: nothing, the cache is there)."""
    layers: list
    settings: dict       # the cache key, with "layers"
    todo: np.ndarray     # table rows to compute, in order
    reuse: Reuse         # rows copied from the cache being updated
    split: np.ndarray    # the split to record per row
    note: str = ""


DATA_KEYS = ("dataset_fingerprint", "split_source", "duplicates")  # what --update can bring up to date


def plan_extraction(path, table, layers, settings, resolve, update=False, rebuild=False):
    """Compare the request (`layers`, the cache key `settings`) with the cache at `path` -> Plan: a hit,
    a fresh run, or an update. `resolve(specs)` gives layers, for when the cache's layers are added."""
    def fresh(layers, note=""):
        return Plan(layers, {**settings, "layers": [layer.name for layer in layers]},
                    np.arange(len(table)), Reuse(), np.asarray(table.split), note)

    existing = None if rebuild or not path.exists() else read_cache_settings(path)
    if existing is None:
        return fresh(layers, f"rebuilding {path}; " if rebuild and path.exists() else "")
    changed = _differences(existing, settings)
    have = list(existing.get("layers", []))
    more = [layer.name for layer in layers if layer.name not in have]
    if not changed and not more:
        if read_partial_settings(path) == existing:
            remove_partial(path)  # left by a run killed between its last rename and its clean-up
        return Plan(layers, existing, None, Reuse(), None, f"{path}: cache found with these settings; nothing to do")
    union = resolve(have + more)
    if not changed:
        return fresh(union, f"adding layers to {path} (it had {', '.join(have)}); ")
    if not set(changed) <= set(DATA_KEYS):
        return fresh(layers, f"{path} was made with other {', '.join(changed)}; rebuilding it (the old file stays until done); ")
    with FeatureCache(path) as old:
        change = DataChange.between(old, table)
        rule = "duplicates" in changed  # asked for explicitly (extract.duplicates_rule): an update, no more
        if not update and not rule:
            raise StaleCacheError(
                f"{path}: the data set changed since this cache was made ({change}); run again with --update "
                "(UPDATE=1 to make extract or make sweep) to extract only new and changed images and keep the rest, "
                "or --rebuild (REBUILD=1) to start over")
        if more:
            return fresh(union, f"{change}; more layers asked for, so rebuilding {path}; ")
        split = np.asarray(table.split).copy()
        rows = np.array(sorted(change.was_at), dtype=np.int64)
        before = old.split[np.array([change.was_at[row] for row in rows], dtype=np.int64)]
        split[rows] = _kept_split(split[rows], before, table.own_splits)
        return Plan(union, {**settings, "layers": have}, np.setdiff1d(np.arange(len(table)), change.kept_rows),
                    Reuse.from_cache(old, change.kept_rows, change.kept_from), split,
                    f"updating {path}{_rule_note(table) if rule else ''}: {change}; ")


def _kept_split(now, before, own):
    """The split of images the cache holds: the one they had (a new draw could move a train image into
    test), unless the data set's own val or test folders (or files) moved them, into or out of one."""
    given = [name for name in own if name != "train"]
    return np.where(np.isin(now, given) | np.isin(before, given), now, before)


def _rule_note(table):
    return " to drop duplicates" if table.drop_duplicates else " to keep duplicates"


@dataclass
class DataChange:
    """How a data set differs from the one a cache was made from, row by row (ids and stamps). An image
    found by its content at another id has moved: a renamed or moved file, or a pixel row renumbered by
    a row inserted or deleted above it; it keeps its codes and its split. A file whose stamp (size and
    time) changed but not its bytes is touched, and kept too."""
    new: list
    removed: list
    changed: list
    relabelled: list
    retried: list           # skipped last time (unreadable ...), tried again
    kept_rows: np.ndarray   # table rows whose codes stay valid ...
    kept_from: np.ndarray   # ... and their rows in the cache
    moved: list = ()        # ids (as now) of images the cache holds under another id
    touched: list = ()      # ids of files with a new stamp and the same bytes
    moved_as: str = "moved to another row"
    was_at: dict = None     # {table row: cache row} of every image the cache held (kept, moved or changed)

    @classmethod
    def between(cls, cache, table):
        ids, stamps, skipped = cache.ids, cache.stamps, {id_ for id_, _ in cache.skipped}
        index = {id_: k for k, id_ in enumerate(ids)}
        kept = {row: index[id_] for row, id_ in enumerate(table.ids)
                if id_ in index and stamps[index[id_]] == table.stamps[row]}
        found = _same_content(cache, stamps, table, index, kept)
        touched = {row for row, k in found.items() if ids[k] == table.ids[row]}
        new, changed, retried, elsewhere = [], [], [], set(found.values())
        was_at = {}
        for row, id_ in enumerate(table.ids):
            if row not in kept and row not in found:  # changed: other content where an image stayed
                stayed = id_ in index and index[id_] not in elsewhere
                (changed if stayed else retried if id_ in skipped else new).append(id_)
                if stayed:
                    was_at[row] = index[id_]  # recomputed, in the split it had
        found.update(kept)
        was_at.update(found)
        kept_rows = np.array(sorted(found), dtype=np.int64)
        kept_from = np.array([found[row] for row in kept_rows], dtype=np.int64)
        relabelled = [table.ids[row] for row, k in zip(kept_rows, kept_from)
                      if cache.class_names[cache.labels[k]] != table.class_names[table.labels[row]]]
        accounted = set(kept_from.tolist()) | {index[id_] for id_ in changed}  # the rest: no longer there
        removed = [id_ for k, id_ in enumerate(ids) if k not in accounted]
        moved = [table.ids[row] for row in kept_rows if row not in kept and row not in touched]
        return cls(new, removed, changed, relabelled, retried, kept_rows, kept_from, moved,
                   [table.ids[row] for row in sorted(touched)],
                   "moved to another row" if table.pixels is not None else "moved or renamed", was_at)

    def __str__(self):
        parts = [f"{len(ids)} {what} (first: {ids[0]})" for what, ids in
                 (("new", self.new), ("removed", self.removed), ("changed", self.changed),
                  (self.moved_as, self.moved), ("touched, the same bytes", self.touched),
                  ("relabelled", self.relabelled), ("skipped before, to retry", self.retried)) if ids]
        return ", ".join(parts) or "the same images, other listing rules (skipped rows or splits)"


def _same_content(cache, stamps, table, index, kept):
    """{table row: cache row}, one to one, for rows not `kept` whose content a cache row not kept has;
    an image still at its id (touched) keeps its own row before any other takes it (a copy of it).
    A pixel row's stamp is its content's hash. A file's stamp is its size and time, so only files of a
    size that such a cache row had are read here, and their sha256 compared with the cache's."""
    taken = set(kept.values())
    free = [k for k in range(len(stamps)) if k not in taken]
    rows = [row for row in range(len(table)) if row not in kept]
    if table.pixels is not None:
        theirs, ours = [stamps[k] for k in free], [table.stamps[row] for row in rows]
    else:
        sizes = {_size(stamps[k]) for k in free}
        rows = [row for row in rows if _size(table.stamps[row]) in sizes]
        if not rows:
            return {}
        theirs = cache.sha256[free] if len(free) > 1000 else cache.sha256_of(free)
        ours = content_sha256(table.root, [table.ids[row] for row in rows])
    content_of = dict(zip(free, theirs))
    found = {row: index[table.ids[row]] for row, content in zip(rows, ours)
             if content and content_of.get(index.get(table.ids[row])) == content}
    by_content, used = {}, set(found.values())
    for k in free:
        if k not in used:
            by_content.setdefault(content_of[k], []).append(k)
    for row, content in zip(rows, ours):
        if row not in found and content and by_content.get(content):
            found[row] = by_content[content].pop(0)
    return found


def _size(stamp):
    return stamp.split(":")[0]


def cache_key(table, backbone, precision, jpeg_draft=True, decode="cpu"):
    """Everything that changes the cached values (layers are added by the plan)."""
    return {"dataset": table.name, "layout": table.layout, "dataset_fingerprint": table.fingerprint,
            "split_source": table.split_source, "model": backbone.name, "weights": backbone.weights,
            "weights_sha256": backbone.weights_sha256, "transform": _describe(backbone.transform),
            "precision": precision, "decode": decode_setting(backbone.transform, jpeg_draft, decode),
            "duplicates": "dropped" if table.drop_duplicates else "kept",
            **({"model_args": backbone.model_args} if backbone.model_args else {})}  # only where set: no churn


def decode_setting(transform, jpeg_draft, decode="cpu"):
    """How images are decoded, as recorded in the cache key; draft decoding, and another decoder where
    the model runs (`decode` "device": device_decode), change pixels slightly."""
    if decode == "device":
        return "device"
    return f"jpeg-draft-{DRAFT_FACTOR}x" if jpeg_draft and draft_size(transform) else "full"


def draft_size(transform):
    """The shorter side the transform resizes to (torchvision's ImageClassification), or None."""
    size = getattr(transform, "resize_size", None)
    return int(size[0]) if isinstance(size, (list, tuple)) and len(size) == 1 else None


# Caches made before a key was recorded: what they did.
_UNRECORDED = {"decode": "full", "duplicates": "kept", "model_args": ""}


def _differences(old, new):
    return [key for key in new if key != "layers" and old.get(key, _UNRECORDED.get(key)) != new[key]]


def _describe(transform):
    return " ".join(repr(transform).split())
