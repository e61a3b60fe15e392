"""The partial folder: an extraction's rows on disk while it runs, crash-safe.

    <name>.h5.partial/
        table.npz                    ids, labels, split, stamps of every row; the rows to compute;
                                     rows reused from the cache being updated; the listing's skipped rows
        meta.json                    settings, attributes, class names, layer sizes (written last:
                                     the folder is a partial cache once this exists)
        batch-<first>-<count>.npz    one per batch: rows, codes per layer, sha256, decode failures

Every file is written under a temporary name, flushed and renamed, so a kill at any
moment (even SIGKILL) leaves whole batches only; `PartialCache.resume` continues after
the last one. `finish()` assembles the batches into the cache file (see cache.py).
Arrays load with allow_pickle=False: nothing read here is ever unpickled.
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

import numpy as np

from ..errors import CacheError, IncompleteCacheError
from .cache import CACHE_FORMAT, FeatureCache, copy_rows, write_cache_file, write_rows

_BATCH = re.compile(r"batch-(\d{10})-(\d{7})\.npz")
_PACKED = ("ids", "split", "stamps", "skipped_ids", "skipped_reasons")  # the text columns of table.npz


def partial_path(path):
    """The folder an unfinished extraction into `path` lives in."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


def _assembling_path(path):
    return Path(path).with_name(Path(path).name + ".assembling")


@contextmanager
def extraction_lock(path):
    """Hold `<cache>.lock` while extracting into `path`; a second extraction is told who holds it.
    An flock, so the kernel releases it when the holder dies, even by SIGKILL: no stale locks."""
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


def _fsync(path):
    """Flush a file's data, or a folder's entries, to the disk (a closed h5py file is only in the OS's cache)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pack(strings):
    """Strings -> uint8 [bytes]: UTF-8, each ended by a NUL (which no path, label or reason holds).
    A unicode array would pad every id to the longest (4 bytes a character); this loads without pickle."""
    return np.frombuffer("".join(f"{str(s).replace(chr(0), chr(0xFFFD))}\0" for s in strings).encode("utf-8"),
                         dtype=np.uint8)


def _unpack(packed):
    return np.array(packed.tobytes().decode("utf-8").split("\0")[:-1], dtype=object)


class Reuse:
    """Rows of a new cache copied from an existing one (`make extract --update`).

    `rows`: indices in the new cache; `from_rows`: their indices in `source["path"]`;
    `source`: the old cache's path and identity (settings + creation time), so a resumed
    update never copies from a cache that changed in between.
    """

    def __init__(self, rows=(), from_rows=(), source=None):
        self.rows = np.asarray(rows, dtype=np.int64)
        self.from_rows = np.asarray(from_rows, dtype=np.int64)
        self.source = source

    @classmethod
    def from_cache(cls, cache, rows, from_rows):
        return cls(rows, from_rows, {"path": str(cache.path), "settings": cache.attrs.get("settings"),
                                     "created": cache.attrs.get("created")})


class PartialCache:
    """An extraction in progress: one batch file per batch in `<cache>.partial/`.

    `PartialCache.create(...)` starts one (removing any other partial one); `PartialCache.resume(path)`
    continues an interrupted one after its last whole batch. Rows are computed in the order of
    `todo` (row indices, default: every row); rows of `reuse` are copied from an existing cache.
    """

    def __init__(self, path, meta, table, batches):
        self.path, self.folder = Path(path), partial_path(path)
        self.meta, self.table = meta, table
        self.todo = table["todo"]
        self._batches = batches  # [(first, count, file name)], contiguous from 0

    @classmethod
    def create(cls, path, *, ids, labels, split, class_names, layer_dims, attrs, stamps=None,
               todo=None, reuse=None, skipped=()):
        """Start a cache of N rows; `layer_dims` maps layer name -> (D, layer attrs).
        `skipped`: (id, reason) of images left out before extraction."""
        n, reuse = len(ids), reuse or Reuse()
        text = {"ids": ids, "split": split, "stamps": stamps if stamps is not None else [""] * n,
                "skipped_ids": [i for i, _ in skipped], "skipped_reasons": [r for _, r in skipped]}
        table = {**{key: np.array(list(map(str, values)), dtype=object) for key, values in text.items()},
                 "labels": np.asarray(labels, dtype=np.int64),
                 "todo": np.arange(n, dtype=np.int64) if todo is None else np.asarray(todo, dtype=np.int64),
                 "reuse_rows": reuse.rows, "reuse_from": reuse.from_rows}
        if len(table["todo"]) + len(reuse.rows) != n:
            raise ValueError(f"{len(table['todo'])} rows to compute and {len(reuse.rows)} reused, of {n}")
        meta = {"format": CACHE_FORMAT, "n_rows": n, "n_todo": len(table["todo"]), "attrs": attrs,
                "settings": attrs.get("settings"), "class_names": list(class_names),
                "layer_dims": {name: [int(dim), layer_attrs] for name, (dim, layer_attrs) in layer_dims.items()},
                "reuse": reuse.source}
        folder = partial_path(path)
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

    def append(self, batch, codes):
        """Write the next batch: `batch.rows` must be the next rows of `todo`; `codes` maps every
        layer name to float32 [B, D]; `batch.sha256` and `batch.failures` (why a row could not be
        decoded, "" if it was) are per row."""
        first, count = self.n_done, len(batch.rows)
        if count == 0 or not np.array_equal(batch.rows, self.todo[first:first + count]):
            raise CacheError(f"{self.path}: a batch of rows {np.asarray(batch.rows)[:3].tolist()} is not the next "
                             f"of the {len(self.todo)} rows to compute (row {first} is)")
        shapes = {name: np.shape(values) for name, values in codes.items()}
        wanted = {name: (count, dim) for name, (dim, _) in self.meta["layer_dims"].items()}
        if shapes != wanted or len(batch.sha256) != count or len(batch.failures) != count:
            raise CacheError(f"{self.path}: a batch of {count} rows with codes {shapes}, {len(batch.sha256)} "
                             f"hashes and {len(batch.failures)} failures; expected codes {wanted}")
        arrays = {f"layer/{name}": np.asarray(values, dtype=np.float32) for name, values in codes.items()}
        arrays.update(rows=np.asarray(batch.rows, dtype=np.int64), sha256=_pack(batch.sha256),
                      failures=_pack(batch.failures))
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
                self._assemble(tmp, attrs)
                _fsync(tmp)  # on disk, under its name, before the batches it was made of are removed:
                os.replace(tmp, self.path)
                _fsync(self.path.parent)  # a power cut then finds the cache, or the batches to resume from
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        shutil.rmtree(self.folder, ignore_errors=True)

    def _batch_files(self):
        """Each batch file's arrays, in order (one open at a time)."""
        for _, _, name in self._batches:
            with np.load(self.folder / name, allow_pickle=False) as npz:
                yield npz

    def _outcomes(self):
        """Per row: its sha256, and why it failed to decode ({row: reason} for the failed rows)."""
        sha256, failures = np.full(self.meta["n_rows"], "", dtype=object), {}
        for npz in self._batch_files():
            rows, reasons = npz["rows"], _unpack(npz["failures"])
            sha256[rows] = _unpack(npz["sha256"])
            failures.update((int(row), str(reason)) for row, reason in zip(rows, reasons) if reason)
        if len(self.table["reuse_rows"]):
            with FeatureCache(self.reuse_source["path"]) as old:
                sha256[self.table["reuse_rows"]] = old.sha256[self.table["reuse_from"]]
        return sha256, failures

    def _assemble(self, tmp, attrs):
        """Write the complete cache file `tmp`: rows that decoded, in table order; failed rows skipped."""
        sha256, failures = self._outcomes()
        decoded = np.ones(self.meta["n_rows"], dtype=bool)
        decoded[list(failures)] = False
        kept, position = np.flatnonzero(decoded), np.cumsum(decoded) - 1  # table row -> its row in the file
        t = self.table
        columns = {"labels": t["labels"][kept], "ids": t["ids"][kept], "split": t["split"][kept],
                   "stamp": t["stamps"][kept], "sha256": sha256[kept]}
        failed = sorted(failures)
        skipped = (list(t["skipped_ids"]) + [str(t["ids"][row]) for row in failed],
                   list(t["skipped_reasons"]) + [failures[row] for row in failed])

        def fill(layers):
            for npz in self._batch_files():
                ok = _unpack(npz["failures"]) == ""
                for name in layers:
                    write_rows(layers[name], position[npz["rows"][ok]], npz[f"layer/{name}"][ok])
            if len(t["reuse_rows"]):
                with FeatureCache(self.reuse_source["path"]) as old:
                    copy_rows(old, layers, position[t["reuse_rows"]], t["reuse_from"])

        write_cache_file(tmp, columns, skipped, self.meta["layer_dims"], self.meta["class_names"],
                         {**self.meta["attrs"], **attrs}, fill)


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


def partial_progress(path):
    """(rows done, rows to compute) of the interrupted extraction into `path`, or (None, None)."""
    folder = partial_path(path)
    meta = _read_meta(folder) if folder.is_dir() else None
    if meta is None:
        return None, None
    return sum(count for _, count, _ in _whole_batches(folder, meta["n_todo"])), meta["n_todo"]


def remove_partial(path):
    """Remove what an extraction into `path` left behind: its partial folder, a half-assembled file."""
    shutil.rmtree(partial_path(path), ignore_errors=True)
    _assembling_path(path).unlink(missing_ok=True)


def read_partial_settings(path):
    """The settings an interrupted extraction into `path` was started with, or None."""
    meta = _read_meta(partial_path(path))
    return meta and meta.get("settings")
