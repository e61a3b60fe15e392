"""The on-disk formats: feature caches and head files, both HDF5.

This is the only module that knows the layout (and the only importer of h5py).
A feature cache, `FEATURES_DIR/<dataset>/<model>-<weights tag>.h5`:

    /layers/<name>  float32 [N, D]  chunked, one per tapped layer (attrs: node, pooling, raw_shape)
    /labels         int64   [N]     index into the class_names attribute
    /ids            utf-8   [N]     file path relative to the data set, or row number
    /split          utf-8   [N]     "train" | "val" | "test"
    attributes      format, complete, n_rows, n_done, settings (JSON: the cache key),
                    class_names (JSON), model, weights, weights_sha256, transform,
                    pooling (JSON), dataset_fingerprint, versions (JSON), device,
                    precision, batch_size, images_per_s, seconds, created

Rows are appended batch by batch into `<name>.h5.partial`; only a finished
extraction is renamed to `<name>.h5`, so a file under the final name is always
complete. Every structured attribute is JSON, parsed as data only: nothing
read from a file is ever executed or unpickled.
"""
import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from .errors import CacheError, IncompleteCacheError

CACHE_FORMAT = "pipeline-features/1"
HEAD_FORMAT = "pipeline-head/1"
SPLITS = ("train", "val", "test")
_TEXT = h5py.string_dtype("utf-8")
_CHUNK_BYTES = 512 * 1024  # h5py advises chunks of 10 KiB - 1 MiB


def partial_path(path):
    """Where an unfinished extraction into `path` lives."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


@contextmanager
def extraction_lock(path):
    """Hold `<cache>.lock` while extracting into `path`; a second extraction is told who holds it.

    An flock, so the kernel releases it when the holder dies, even by SIGKILL: no stale locks.
    """
    lock_path = Path(path).with_name(Path(path).name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise CacheError(f"{path}: another `make extract` is writing this cache ({holder}); "
                             "wait for it to finish, or stop it and re-run to resume") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


def _to_attr(value):
    """Plain strings and numbers as they are, anything structured as JSON text."""
    if isinstance(value, (str, bool, int, float, np.integer, np.floating)):
        return value
    return json.dumps(value)


def _from_attr(value):
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def _read_attrs(node):
    return {key: _from_attr(value) for key, value in node.attrs.items()}


def _open_h5(path, mode, remedy="delete it and run `make extract` again"):
    try:
        return h5py.File(path, mode)
    except BlockingIOError:
        raise CacheError(f"{path}: in use by another process (a running `make extract`?); "
                         "wait for it to finish, then try again") from None
    except OSError as e:
        raise CacheError(f"{path}: not a readable HDF5 file ({e}); {remedy}") from None


# ---------------------------------------------------------------------------
# Feature caches


class CacheWriter:
    """Appends rows to a `.partial` cache file; `finish()` makes it the cache.

    Use `CacheWriter.create(...)` for a new extraction or `CacheWriter.resume(path)`
    to continue one that was interrupted.
    """

    def __init__(self, path, h5):
        self.path = Path(path)
        self.h5 = h5

    @classmethod
    def create(cls, path, *, ids, labels, split, class_names, layer_dims, attrs):
        """Start a cache for N rows; `layer_dims` maps layer name -> (D, layer attrs)."""
        tmp = partial_path(path)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        h5 = _open_h5(tmp, "w")
        h5.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
        h5.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=_TEXT)
        h5.create_dataset("split", data=np.asarray(split, dtype=object), dtype=_TEXT)
        group = h5.create_group("layers")
        for name, (dim, layer_attrs) in layer_dims.items():
            rows = max(1, min(4096, _CHUNK_BYTES // (4 * dim)))
            ds = group.create_dataset(name, shape=(0, dim), maxshape=(None, dim), dtype="float32", chunks=(rows, dim))
            for key, value in layer_attrs.items():
                ds.attrs[key] = _to_attr(value)
        for key, value in attrs.items():
            h5.attrs[key] = _to_attr(value)
        h5.attrs["format"] = CACHE_FORMAT
        h5.attrs["class_names"] = json.dumps(list(class_names))
        h5.attrs["n_rows"] = len(labels)
        h5.attrs["n_done"] = 0
        h5.attrs["complete"] = False
        h5.flush()
        return cls(path, h5)

    @classmethod
    def resume(cls, path):
        return cls(path, _open_h5(partial_path(path), "r+"))

    @property
    def n_done(self):
        return int(self.h5.attrs["n_done"])

    @property
    def settings(self):
        return _from_attr(self.h5.attrs["settings"])

    def append(self, rows):
        """Write one batch: `rows` maps every layer name to a float array [B, D]."""
        start = self.n_done
        count = None
        for name, values in rows.items():
            ds = self.h5["layers"][name]
            count = len(values)
            ds.resize(start + count, axis=0)
            ds[start:start + count] = values
        self.h5.attrs["n_done"] = start + count
        self.h5.flush()

    def finish(self, attrs):
        """Record the run's figures, mark complete, and move the file into place."""
        if self.n_done != self.h5.attrs["n_rows"]:
            raise CacheError(f"{self.path}: {self.n_done} of {self.h5.attrs['n_rows']} rows written; cannot finish")
        for key, value in attrs.items():
            self.h5.attrs[key] = _to_attr(value)
        self.h5.attrs["complete"] = True
        self.close()
        os.replace(partial_path(self.path), self.path)

    def close(self):
        if self.h5.id.valid:
            self.h5.close()


def _progress(partial):
    """(rows done, rows in all) of a partial cache, even while a writer holds it; (None, None) if unreadable."""
    for options in ({}, {"locking": False}):  # a writer in another process holds HDF5's file lock
        try:
            with h5py.File(partial, "r", **options) as h5:
                return int(h5.attrs["n_done"]), int(h5.attrs["n_rows"])
        except (OSError, KeyError):
            continue
    return None, None


class FeatureCache:
    """A finished feature cache, open for reading. Use as a context manager."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            tmp = partial_path(self.path)
            if tmp.exists():
                done, total = _progress(tmp)
                if done is None:
                    raise IncompleteCacheError(
                        f"{self.path}: not finished ({tmp} is being written or was cut off); wait for the "
                        "running `make extract`, or re-run the same `make extract` command")
                raise IncompleteCacheError(
                    f"{self.path}: extraction stopped after {done} of {total} images; "
                    "re-run the same `make extract` command to resume it"
                )
            raise CacheError(f"{self.path}: no such feature cache; run `make extract` first")
        self.h5 = _open_h5(self.path, "r")
        if self.h5.attrs.get("format") != CACHE_FORMAT or not self.h5.attrs.get("complete", False):
            self.h5.close()
            raise CacheError(f"{self.path}: not a complete {CACHE_FORMAT} cache; delete it and run `make extract` again")
        self.attrs = _read_attrs(self.h5)
        self.class_names = self.attrs["class_names"]
        self.labels = self.h5["labels"][:]
        self.ids = self.h5["ids"].asstr()[:]
        self.split = self.h5["split"].asstr()[:]
        self.layers = list(self.h5["layers"].keys())

    def layer_attrs(self, layer):
        return _read_attrs(self.h5["layers"][layer])

    def features(self, layer, split=None):
        """The codes of one layer [N, D] (of one split when given) and their labels."""
        if layer not in self.h5["layers"]:
            raise CacheError(f"{self.path}: no layer {layer!r}; it has {', '.join(self.layers)}")
        if split is None:
            return self.h5["layers"][layer][:], self.labels
        mask = self.split == split
        return self.h5["layers"][layer][np.flatnonzero(mask)], self.labels[mask]

    def close(self):
        self.h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_cache_settings(path):
    """The settings a finished or partial cache was made with, or None if unreadable."""
    try:
        with h5py.File(path, "r") as h5:
            return _from_attr(h5.attrs["settings"])
    except (OSError, KeyError):
        return None


# ---------------------------------------------------------------------------
# Head files: a linear classifier as plain arrays, no pickle.


def write_head(path, *, coef, intercept, scaler_mean, scaler_scale, attrs):
    """Save a head: scores = ((x - mean) / scale) @ coef.T + intercept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with h5py.File(tmp, "w") as h5:
        h5.create_dataset("coef", data=np.asarray(coef, dtype=np.float32))
        h5.create_dataset("intercept", data=np.asarray(intercept, dtype=np.float32))
        h5.create_dataset("scaler_mean", data=np.asarray(scaler_mean, dtype=np.float64))
        h5.create_dataset("scaler_scale", data=np.asarray(scaler_scale, dtype=np.float64))
        h5.attrs["format"] = HEAD_FORMAT
        for key, value in attrs.items():
            h5.attrs[key] = _to_attr(value)
    os.replace(tmp, path)


def read_head(path):
    """Load a head file -> (arrays dict, attrs dict). Checks shapes agree."""
    path = Path(path)
    if not path.exists():
        raise CacheError(f"{path}: no such head file; train one with `make train-head`")
    with _open_h5(path, "r", remedy="train it again with `make train-head`") as h5:
        if h5.attrs.get("format") != HEAD_FORMAT:
            raise CacheError(f"{path}: not a {HEAD_FORMAT} file; train one with `make train-head`")
        try:
            arrays = {key: np.asarray(h5[key][()]) for key in ("coef", "intercept", "scaler_mean", "scaler_scale")}
        except KeyError as e:
            raise CacheError(f"{path}: head file lacks {e}; train it again with `make train-head`") from None
        attrs = _read_attrs(h5)
    if not all(np.issubdtype(a.dtype, np.number) and np.isfinite(a).all() for a in arrays.values()):
        raise CacheError(f"{path}: head arrays must be finite numbers; train it again with `make train-head`")
    k, d = arrays["coef"].shape if arrays["coef"].ndim == 2 else (0, 0)
    if k == 0 or arrays["intercept"].shape != (k,) or arrays["scaler_mean"].shape != (d,) or arrays["scaler_scale"].shape != (d,):
        raise CacheError(f"{path}: head arrays have inconsistent shapes; train it again with `make train-head`")
    return arrays, attrs

