"""The on-disk formats: feature caches and head files, both HDF5.

This is the only module that knows the layout (and the only importer of h5py).
A feature cache, `FEATURES_DIR/<dataset>/<model>-<weights tag>.h5`:

    /layers/<name>    float32 [N, D]  chunked, one per tapped layer (attrs: node, pooling, raw_shape)
    /labels           int64   [N]     index into the class_names attribute
    /ids              utf-8   [N]     file path relative to the data set, or row number
    /split            utf-8   [N]     "train" | "val" | "test"
    /sha256           utf-8   [N]     content hash of each image (the leakage check)
    /stamp            utf-8   [N]     size:mtime of each file, or a hash of its pixels (what --update compares)
    /skipped/ids      utf-8   [S]     images left out: unreadable, missing, unlabelled, duplicates ...
    /skipped/reasons  utf-8   [S]     ... and why, one short line each
    attributes        format, complete, n_rows, n_skipped, settings (JSON: the cache key),
                      class_names (JSON), model, weights, weights_sha256, transform,
                      pooling (JSON), dataset_fingerprint, versions (JSON), device,
                      precision, batch_size, images_per_s, seconds, created

While extraction runs, its rows live in the folder `<name>.h5.partial/`:

    table.npz            ids, labels, split, stamps of every row; the rows to compute;
                         rows reused from the cache being updated; the listing's skipped rows
    meta.json            settings, attributes, class names, layer sizes (written last: the
                         folder is a partial cache once this exists)
    batch-<first>-<count>.npz   one per batch: codes per layer, sha256, decode failures

Every file there is written under a temporary name, flushed, and renamed, so a kill
at any moment (even SIGKILL) leaves whole batches only; resuming continues after the
last one. `finish()` assembles the batches into `<name>.h5.assembling`, renames that
to `<name>.h5` and removes the folder: a file under the final name is always complete.
Every structured attribute is JSON, parsed as data only; arrays are read with
allow_pickle=False: nothing read from a file is ever executed or unpickled.
"""
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from .errors import CacheError, IncompleteCacheError

CACHE_FORMAT = "pipeline-features/2"
HEAD_FORMAT = "pipeline-head/1"
SPLITS = ("train", "val", "test")
_TEXT = h5py.string_dtype("utf-8")
_CHUNK_BYTES = 512 * 1024  # h5py advises chunks of 10 KiB - 1 MiB
_BATCH = re.compile(r"batch-(\d{10})-(\d{7})\.npz")
_COPY_ROWS = 8192  # rows per block when assembling or copying reused rows


def partial_path(path):
    """The folder an unfinished extraction into `path` lives in."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def _assembling_path(path):
    return Path(path).with_name(Path(path).name + ".assembling")


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


@contextmanager
def _disk_errors(path, what):
    """An OSError while writing becomes one line saying what is safe and what to do."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheError(f"{path}: disk full while {what}; every finished batch is kept in "
                             f"{partial_path(path)}: free some space and re-run the same command to resume") from None
        raise CacheError(f"{path}: cannot write while {what} ({e.strerror or e}); "
                         "fix that and re-run the same command to resume") from None


def _write_atomically(path, write):
    """write(file object) into `path.tmp`, flush it to disk, then rename it to `path`."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_PACKED = ("ids", "split", "stamps", "skipped_ids", "skipped_reasons")  # the text columns of table.npz


def _pack(strings):
    """Strings -> uint8 [bytes]: UTF-8, each ended by a NUL (which no path, label or reason holds).
    A unicode array would pad every id to the longest (4 bytes a character); this loads without pickle."""
    return np.frombuffer("".join(f"{str(s).replace(chr(0), chr(0xFFFD))}\0" for s in strings).encode("utf-8"),
                         dtype=np.uint8)


def _unpack(packed):
    return np.array(packed.tobytes().decode("utf-8").split("\0")[:-1], dtype=object)


# ---------------------------------------------------------------------------
# Writing a feature cache


class CacheWriter:
    """Writes one batch file per batch into `<cache>.partial/`; `finish()` makes the cache.

    `CacheWriter.create(...)` starts an extraction (removing any other partial one);
    `CacheWriter.resume(path)` continues an interrupted one after its last whole batch.
    Rows are computed in the order of `todo` (row indices, default: every row); rows of
    `reuse` are copied from an existing cache instead (see `Reuse`).
    """

    def __init__(self, path, meta, table, batches):
        self.path = Path(path)
        self.folder = partial_path(path)
        self.meta, self.table = meta, table
        self.todo = table["todo"]
        self._batches = batches  # [(first, count, file name)], contiguous from 0

    @classmethod
    def create(cls, path, *, ids, labels, split, class_names, layer_dims, attrs, stamps=None,
               todo=None, reuse=None, skipped=()):
        """Start a cache of N rows; `layer_dims` maps layer name -> (D, layer attrs).
        `skipped`: (id, reason) of images left out before extraction."""
        path = Path(path)
        folder = partial_path(path)
        n = len(ids)
        reuse = reuse or Reuse.none()
        text = {"ids": ids, "split": split, "stamps": stamps if stamps is not None else [""] * n,
                "skipped_ids": [i for i, _ in skipped], "skipped_reasons": [r for _, r in skipped]}
        table = {**{key: np.array(list(map(str, values)), dtype=object) for key, values in text.items()},
                 "labels": np.asarray(labels, dtype=np.int64),
                 "todo": np.arange(n, dtype=np.int64) if todo is None else np.asarray(todo, dtype=np.int64),
                 "reuse_rows": reuse.rows, "reuse_from": reuse.from_rows}
        meta = {"format": CACHE_FORMAT, "n_rows": n, "n_todo": len(table["todo"]), "attrs": attrs,
                "settings": attrs.get("settings"), "class_names": list(class_names),
                "layer_dims": {name: [int(dim), layer_attrs] for name, (dim, layer_attrs) in layer_dims.items()},
                "reuse": reuse.source}
        if len(table["todo"]) + len(reuse.rows) != n:
            raise ValueError(f"{len(table['todo'])} rows to compute and {len(reuse.rows)} reused, of {n}")
        with _disk_errors(path, "starting the extraction"):
            shutil.rmtree(folder, ignore_errors=True)
            if folder.exists() or folder.is_symlink():
                folder.unlink()  # a file of that name, e.g. a partial cache of the old format
            folder.mkdir(parents=True)
            packed = {key: _pack(values) if key in _PACKED else values for key, values in table.items()}
            _write_atomically(folder / "table.npz", lambda f: np.savez(f, **packed))
            _write_atomically(folder / "meta.json", lambda f: f.write(json.dumps(meta).encode()))
        return cls(path, meta, table, [])

    @classmethod
    def resume(cls, path):
        """The interrupted extraction into `path`; IncompleteCacheError if its folder is unreadable."""
        folder = partial_path(path)
        meta = _read_meta(folder)
        if meta is None:
            raise IncompleteCacheError(f"{folder}: not a readable partial cache; delete it and run `make extract` again")
        with np.load(folder / "table.npz", allow_pickle=False) as npz:
            table = {key: _unpack(npz[key]) if key in _PACKED else npz[key] for key in npz.files}
        for stray in folder.glob("*.tmp"):
            stray.unlink(missing_ok=True)
        return cls(path, meta, table, _whole_batches(folder, meta["n_todo"], prune=True))

    @property
    def n_done(self):
        """Rows of `todo` finished so far."""
        return self._batches[-1][0] + self._batches[-1][1] if self._batches else 0

    @property
    def settings(self):
        return self.meta["settings"]

    @property
    def reuse_source(self):
        return self.meta["reuse"]

    def append(self, codes, sha256=None, failures=None):
        """Write the next batch: `codes` maps every layer name to float32 [B, D]; `sha256` and
        `failures` are per row (the content hash; why a row could not be decoded, "" if it was)."""
        count = len(next(iter(codes.values())))
        first = self.n_done
        if first + count > len(self.todo):
            raise CacheError(f"{self.path}: more rows appended than the {len(self.todo)} to compute")
        arrays = {f"layer/{name}": np.asarray(values, dtype=np.float32) for name, values in codes.items()}
        arrays["rows"] = self.todo[first:first + count]
        arrays["sha256"] = _pack(sha256 if sha256 is not None else [""] * count)
        arrays["failures"] = _pack(failures if failures is not None else [""] * count)
        name = f"batch-{first:010d}-{count:07d}.npz"
        with _disk_errors(self.path, f"writing rows {first}-{first + count}"):
            _write_atomically(self.folder / name, lambda f: np.savez(f, **arrays))
        self._batches.append((first, count, name))

    def finish(self, attrs):
        """Assemble the batches (and reused rows) into the cache file, then remove the folder."""
        if self.n_done != len(self.todo):
            raise CacheError(f"{self.path}: {self.n_done} of {len(self.todo)} rows written; cannot finish")
        tmp = _assembling_path(self.path)
        try:
            with _disk_errors(self.path, "assembling the finished cache"):
                _assemble(tmp, self.folder, self.meta, self.table, self._batches, attrs)
                os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        shutil.rmtree(self.folder, ignore_errors=True)

    def close(self):
        """Nothing stays open between batches; kept so callers can always close."""


class Reuse:
    """Rows of a new cache copied from an existing one (`make extract --update`).

    `rows`: indices in the new cache; `from_rows`: their indices in `source["path"]`;
    `source`: the old cache's path and identity (settings + creation time), so a resumed
    update never copies from a cache that changed in between.
    """

    def __init__(self, rows, from_rows, source):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.from_rows = np.asarray(from_rows, dtype=np.int64)
        self.source = source

    @classmethod
    def none(cls):
        return cls([], [], None)

    @classmethod
    def from_cache(cls, cache, rows, from_rows):
        return cls(rows, from_rows, {"path": str(cache.path), "settings": cache.attrs.get("settings"),
                                     "created": cache.attrs.get("created")})


def _read_meta(folder):
    try:
        meta = json.loads((Path(folder) / "meta.json").read_text())
        return meta if isinstance(meta, dict) and meta.get("format") == CACHE_FORMAT else None
    except (OSError, ValueError):
        return None


def _whole_batches(folder, n_todo, prune=False):
    """The batch files that continue each other from row 0: [(first, count, name)].
    `prune`: remove the others (left by a run cut off mid-way through a rename)."""
    found = sorted((int(m[1]), int(m[2]), m[0]) for m in map(_BATCH.fullmatch, os.listdir(folder)) if m)
    whole, expected = [], 0
    for first, count, name in found:
        if first == expected and count > 0 and first + count <= n_todo:
            whole.append((first, count, name))
            expected += count
        elif prune:
            (Path(folder) / name).unlink(missing_ok=True)
    return whole


def _assemble(tmp, folder, meta, table, batches, attrs):
    """Write the complete cache file `tmp` from the batch files and the reused rows."""
    n = meta["n_rows"]
    failed = np.zeros(n, dtype=bool)
    failures, sha256 = {}, np.full(n, "", dtype=object)
    for _, _, name in batches:  # first the small per-row arrays: which rows failed
        with np.load(folder / name, allow_pickle=False) as npz:
            rows, reasons = npz["rows"], _unpack(npz["failures"])
            sha256[rows] = _unpack(npz["sha256"])
        for row, reason in zip(rows[reasons != ""], reasons[reasons != ""]):
            failed[row] = True
            failures[row] = str(reason)
    kept = np.flatnonzero(~failed)
    position = np.cumsum(~failed) - 1  # row -> its row in the file

    source = meta["reuse"]
    old = None
    if len(table["reuse_rows"]):
        old = FeatureCache(source["path"])
        sha256[table["reuse_rows"]] = old.sha256[table["reuse_from"]]

    with h5py.File(tmp, "w") as h5:
        h5.create_dataset("labels", data=table["labels"][kept])
        h5.create_dataset("ids", data=table["ids"][kept], dtype=_TEXT)
        h5.create_dataset("split", data=table["split"][kept], dtype=_TEXT)
        h5.create_dataset("stamp", data=table["stamps"][kept], dtype=_TEXT)
        h5.create_dataset("sha256", data=sha256[kept].astype(object), dtype=_TEXT)
        skipped_ids = list(table["skipped_ids"]) + [str(table["ids"][row]) for row in sorted(failures)]
        skipped_reasons = list(table["skipped_reasons"]) + [failures[row] for row in sorted(failures)]
        group = h5.create_group("skipped")
        group.create_dataset("ids", data=np.asarray(skipped_ids, dtype=object), dtype=_TEXT)
        group.create_dataset("reasons", data=np.asarray(skipped_reasons, dtype=object), dtype=_TEXT)
        layers = h5.create_group("layers")
        for name, (dim, layer_attrs) in meta["layer_dims"].items():
            chunk = max(1, min(4096, _CHUNK_BYTES // (4 * dim)))
            ds = layers.create_dataset(name, shape=(len(kept), dim), maxshape=(None, dim), dtype="float32",
                                       chunks=(chunk, dim))
            for key, value in layer_attrs.items():
                ds.attrs[key] = _to_attr(value)
        for _, _, name in batches:  # then the codes, batch by batch
            with np.load(folder / name, allow_pickle=False) as npz:
                ok = _unpack(npz["failures"]) == ""
                where = position[npz["rows"][ok]]
                for layer in meta["layer_dims"]:
                    _write_rows(layers[layer], where, npz[f"layer/{layer}"][ok])
        if old is not None:
            try:
                _copy_reused(old, layers, meta["layer_dims"], position[table["reuse_rows"]], table["reuse_from"])
            finally:
                old.close()
        for key, value in {**meta["attrs"], **attrs}.items():
            h5.attrs[key] = _to_attr(value)
        h5.attrs["format"] = CACHE_FORMAT
        h5.attrs["class_names"] = json.dumps(meta["class_names"])
        h5.attrs["n_rows"] = len(kept)
        h5.attrs["n_skipped"] = len(skipped_ids)
        h5.attrs["complete"] = True


def _write_rows(ds, where, values):
    """ds[where] = values for increasing `where`: one slice when they are contiguous."""
    if len(where) == 0:
        return
    if where[-1] - where[0] == len(where) - 1:
        ds[where[0]:where[-1] + 1] = values
    else:
        ds[where] = values


def _copy_reused(old, layers, layer_dims, to_rows, from_rows):
    """Copy codes of the old cache's rows `from_rows` to rows `to_rows` (increasing), block by block."""
    for lo in range(0, len(to_rows), _COPY_ROWS):
        to, source = to_rows[lo:lo + _COPY_ROWS], from_rows[lo:lo + _COPY_ROWS]
        order = np.argsort(source)  # h5py reads increasing indices
        for layer in layer_dims:
            values = np.empty((len(source), layer_dims[layer][0]), dtype=np.float32)
            values[order] = old.h5["layers"][layer][source[order]]
            _write_rows(layers[layer], to, values)


def _progress(folder):
    """(rows done, rows to compute) of a partial cache folder, read from its file names; (None, None) if unreadable."""
    meta = _read_meta(folder)
    if meta is None:
        return None, None
    done = sum(count for _, count, _ in _whole_batches(folder, meta["n_todo"]))
    return done, meta["n_todo"]


def partial_progress(path):
    """(rows done, rows to compute) of the interrupted extraction into `path`, or (None, None)."""
    folder = partial_path(path)
    return _progress(folder) if folder.is_dir() else (None, None)


def remove_partial(path):
    """Remove what an extraction into `path` left behind: its partial folder, a half-assembled file."""
    shutil.rmtree(partial_path(path), ignore_errors=True)
    _assembling_path(path).unlink(missing_ok=True)


def read_partial_settings(path):
    """The settings an interrupted extraction into `path` was started with, or None."""
    meta = _read_meta(partial_path(path))
    return meta and meta.get("settings")


# ---------------------------------------------------------------------------
# Reading a feature cache


class FeatureCache:
    """A finished feature cache, open for reading. Use as a context manager."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            folder = partial_path(self.path)
            if folder.exists():
                done, total = partial_progress(self.path)
                if done is None:
                    raise IncompleteCacheError(f"{self.path}: not finished ({folder} was cut off before its first "
                                               "batch); re-run the same `make extract` command")
                raise IncompleteCacheError(
                    f"{self.path}: extraction stopped after {done} of {total} images; "
                    "re-run the same `make extract` command to resume it")
            raise CacheError(f"{self.path}: no such feature cache; run `make extract` first")
        if self.path.is_dir():
            raise CacheError(f"{self.path}: is a folder, not a cache file; delete it and run `make extract` again")
        self.h5 = _open_h5(self.path, "r")
        if self.h5.attrs.get("format") != CACHE_FORMAT or not self.h5.attrs.get("complete", False):
            found = _from_attr(self.h5.attrs.get("format", "no format"))
            self.h5.close()
            raise CacheError(f"{self.path}: not a complete {CACHE_FORMAT} cache ({found}); "
                             "delete it and run `make extract` again")
        self.attrs = _read_attrs(self.h5)
        self.class_names = self.attrs["class_names"]
        self.labels = self.h5["labels"][:]
        self.ids = self.h5["ids"].asstr()[:]
        self.split = self.h5["split"].asstr()[:]
        self.layers = list(self.h5["layers"].keys())

    @property
    def sha256(self):
        """Content hash per row (hex)."""
        return self.h5["sha256"].asstr()[:]

    @property
    def stamps(self):
        return self.h5["stamp"].asstr()[:]

    @property
    def skipped(self):
        """[(id, reason)] of the images this cache leaves out."""
        group = self.h5["skipped"]
        return list(zip(group["ids"].asstr()[:], group["reasons"].asstr()[:]))

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
    """The settings a finished cache was made with, or None if it is unreadable or of another format."""
    try:
        with h5py.File(path, "r") as h5:
            if h5.attrs.get("format") != CACHE_FORMAT:
                return None
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

