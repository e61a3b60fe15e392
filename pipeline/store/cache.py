"""The feature cache file, `FEATURES_DIR/<dataset>/<model>-<weights tag>.h5`:

    /layers/<name>    float32 [N, D]  chunked, one per tapped layer (attrs: tap, node, pooling, depth, raw_shape)
    /labels           int64   [N]     index into the class_names attribute
    /ids              utf-8   [N]     file path relative to the data set, or row number
    /split            utf-8   [N]     "train" | "val" | "test"
    /sha256           utf-8   [N]     content hash of each image (the leakage check)
    /stamp            utf-8   [N]     size:mtime of each file, or a hash of its pixels (what --update compares)
    /skipped/ids      utf-8   [S]     images left out: unreadable, missing, unlabelled, duplicates ...
    /skipped/reasons  utf-8   [S]     ... and why, one short line each
    attributes        format, complete, n_rows, n_skipped, settings (JSON: the cache key),
                      class_names (JSON), model, weights, weights_sha256, transform, pooling (JSON),
                      dataset_fingerprint, versions (JSON), device, precision, images_per_s, ...

A file is written whole under a temporary name and renamed (see partial.py), and
carries `complete`: a file under the final name is always finished. Structured
attributes are JSON text, parsed as data only.
"""
import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

from ..errors import CacheError, IncompleteCacheError

CACHE_FORMAT = "pipeline-features/2"
TEXT = h5py.string_dtype("utf-8")
_CHUNK_ROWS = 16  # rows a chunk: small chunks mix a class-sorted cache when streamed (README: Bounded memory) ...
_CHUNK_BYTES = 10 * 1024, 128 * 1024  # ... within these bytes (h5py advises 10 KiB - 1 MiB)
_COPY_ROWS = 8192  # rows per block when copying reused rows
_BLOCK_BYTES = 64 * 2**20  # codes read at once when a layer is streamed
_TEXT_ROWS = 65_536  # rows of a text column read at a time: no Python string per row is kept


def to_attr(value):
    """Plain strings and numbers as they are, anything structured as JSON text."""
    if isinstance(value, (str, bool, int, float, np.integer, np.floating)):
        return value
    return json.dumps(value)


def from_attr(value):
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


def read_attrs(node):
    return {key: from_attr(value) for key, value in node.attrs.items()}


def open_h5(path, remedy="delete it and run `make extract` again"):
    """`path` open for reading; an unreadable file -> CacheError with `remedy`."""
    try:
        return h5py.File(path, "r")
    except BlockingIOError:
        raise CacheError(f"{path}: in use by another process (a running `make extract`?); "
                         "wait for it to finish, then try again") from None
    except OSError as e:
        raise CacheError(f"{path}: not a readable HDF5 file ({e}); {remedy}") from None


# ---------------------------------------------------------------------------
# Writing


def write_cache_file(path, columns, skipped, layer_dims, class_names, attrs, fill):
    """Write a complete cache file at `path`: the per-row `columns` (labels, ids, split, stamp,
    sha256), the `skipped` (ids, reasons), one empty dataset per layer of `layer_dims`
    ({name: [D, layer attrs]}) that `fill(layers)` writes the codes into, then the attributes."""
    with h5py.File(path, "w") as h5:
        h5.create_dataset("labels", data=np.asarray(columns["labels"], dtype=np.int64))
        for key in ("ids", "split", "stamp", "sha256"):
            h5.create_dataset(key, data=np.asarray(columns[key], dtype=object), dtype=TEXT)
        group = h5.create_group("skipped")
        for key, values in zip(("ids", "reasons"), skipped):
            group.create_dataset(key, data=np.asarray(values, dtype=object), dtype=TEXT)
        layers = h5.create_group("layers")
        n = len(columns["labels"])
        for name, (dim, layer_attrs) in layer_dims.items():
            chunk = max(1, min(n, chunk_rows(dim)))  # no larger than the data
            ds = layers.create_dataset(name, shape=(n, dim), dtype="float32", chunks=(chunk, dim) if n else None)
            ds.attrs.update({key: to_attr(value) for key, value in layer_attrs.items()})
        fill(layers)
        h5.attrs.update({key: to_attr(value) for key, value in attrs.items()})
        h5.attrs.update(format=CACHE_FORMAT, class_names=json.dumps(list(class_names)), n_rows=n,
                        n_skipped=len(skipped[0]), complete=True)


def chunk_rows(dim):
    """Rows a chunk of a layer of `dim` float32 codes holds: _CHUNK_ROWS, or as many as _CHUNK_BYTES allow."""
    least, most = _CHUNK_BYTES
    return max(-(-least // (4 * dim)), min(_CHUNK_ROWS, most // (4 * dim)))


def write_rows(ds, where, values):
    """ds[where] = values for increasing `where`: one slice when they are contiguous."""
    if len(where) == 0:
        return
    if where[-1] - where[0] == len(where) - 1:
        ds[where[0]:where[-1] + 1] = values
    else:
        ds[where] = values


def copy_rows(old, layers, to_rows, from_rows):
    """Copy every layer's codes of `old`'s rows `from_rows` to rows `to_rows` (increasing), block by block."""
    for lo in range(0, len(to_rows), _COPY_ROWS):
        to, source = to_rows[lo:lo + _COPY_ROWS], from_rows[lo:lo + _COPY_ROWS]
        order = np.argsort(source)  # h5py reads increasing indices
        for name, ds in layers.items():
            values = np.empty((len(source), ds.shape[1]), dtype=np.float32)
            values[order] = old.h5["layers"][name][source[order]]
            write_rows(ds, to, values)


# ---------------------------------------------------------------------------
# Reading


class FeatureCache:
    """A finished feature cache, open for reading. Use as a context manager."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.exists():
            _explain_missing(self.path)
        if self.path.is_dir():
            raise CacheError(f"{self.path}: is a folder, not a cache file; delete it and run `make extract` again")
        self.h5 = open_h5(self.path)
        if self.h5.attrs.get("format") != CACHE_FORMAT or not self.h5.attrs.get("complete", False):
            found = from_attr(self.h5.attrs.get("format", "no format"))
            self.h5.close()
            raise CacheError(f"{self.path}: not a complete {CACHE_FORMAT} cache ({found}); "
                             "delete it and run `make extract` again")
        try:
            self.attrs = read_attrs(self.h5)
            self.class_names = self.attrs["class_names"]
            self.labels = self.h5["labels"][:]
            self.split = _fixed_width(self.h5["split"])  # numpy str array: a few bytes a row, not a Python str
            self.layers = list(self.h5["layers"].keys())
        except (KeyError, TypeError, ValueError) as e:  # marked complete, yet a part is missing: damaged
            self.h5.close()
            raise CacheError(f"{self.path}: a damaged cache ({type(e).__name__}: {str(e)[:80]}); "
                             "delete it and run `make extract` again") from None

    @property
    def ids(self):
        """Every row's id, read from the file on each use (millions of rows: see `ids_of`)."""
        return self.h5["ids"].asstr()[:]

    def ids_of(self, rows):
        """The ids of `rows` (increasing indices) only."""
        return _text_rows(self.h5["ids"], rows)

    @property
    def sha256(self):
        """Content hash per row (hex)."""
        return self.h5["sha256"].asstr()[:]

    def sha256_of(self, rows):
        return _text_rows(self.h5["sha256"], rows)

    def rows_sharing_content(self):
        """Rows whose content hash may be shared with another row: a superset, found from a 64-bit key of
        the first 16 hex digits read chunk by chunk (16 bytes a row in memory, not a Python string);
        compare `sha256_of` these rows to group them exactly."""
        ds, keys, rows = self.h5["sha256"], [], []
        for lo in range(0, ds.shape[0], _TEXT_ROWS):
            text = np.asarray(ds[lo:lo + _TEXT_ROWS], dtype="S16")  # the first 16 characters, as bytes
            known = np.flatnonzero(text != b"")
            halves = np.ascontiguousarray(text[known]).view(np.uint64).reshape(-1, 2)
            keys.append(halves[:, 0] ^ (halves[:, 1] * np.uint64(0x9E3779B97F4A7C15)))  # wraps: a hash, not a sum
            rows.append(lo + known)
        if not keys:
            return np.zeros(0, dtype=np.int64)
        keys, rows = np.concatenate(keys), np.concatenate(rows)
        order = np.argsort(keys, kind="stable")
        same = keys[order][1:] == keys[order][:-1]        # sorted neighbours with equal keys
        shared = np.zeros(len(keys), dtype=bool)
        shared[order[1:][same]] = shared[order[:-1][same]] = True
        return np.sort(rows[shared])

    @property
    def stamps(self):
        return self.h5["stamp"].asstr()[:]

    @property
    def skipped(self):
        """[(id, reason)] of the images this cache leaves out."""
        group = self.h5["skipped"]
        return list(zip(group["ids"].asstr()[:], group["reasons"].asstr()[:]))

    def layer_attrs(self, layer):
        return read_attrs(self.h5["layers"][layer])

    def features(self, layer, split=None):
        """The codes of one layer [N, D] (of one split when given) and their labels."""
        if layer not in self.h5["layers"]:
            raise CacheError(f"{self.path}: no layer {layer!r}; it has {', '.join(self.layers)}")
        if split is None:
            return self.h5["layers"][layer][:], self.labels
        mask = self.split == split
        return self.h5["layers"][layer][np.flatnonzero(mask)], self.labels[mask]

    def blocks(self, layer, block_bytes=_BLOCK_BYTES):
        """The codes of `layer` in row order, a few whole chunks at a time -> (first row, float32 [B, D]):
        what stage two streams when a layer does not fit in memory."""
        ds = self.h5["layers"][layer]
        chunk, step = ds.chunks[0] if ds.chunks else 1, max(1, block_bytes // (4 * max(ds.shape[1], 1)))
        step = step // chunk * chunk if step >= chunk else step  # whole chunks, unless asked for less
        for lo in range(0, ds.shape[0], step):
            yield lo, ds[lo:lo + step]

    def pieces(self, layer, block_bytes=_BLOCK_BYTES):
        """(rows per piece, pieces per block of `block_bytes`) for reading `layer` at random: a piece is a
        whole chunk (one read each), or smaller where a block would hold fewer than 16."""
        ds = self.h5["layers"][layer]
        step = max(1, block_bytes // (4 * max(ds.shape[1], 1)))
        piece = min(ds.chunks[0] if ds.chunks else 1, max(1, step // 16))
        return piece, max(1, step // piece)

    def read_pieces(self, layer, starts, piece):
        """The rows of the pieces that start at rows `starts` (each `piece` rows long, the last one shorter)
        -> (row indices, float32 [B, D]), read in file order."""
        ds = self.h5["layers"][layer]
        n, d = ds.shape
        starts = np.sort(starts)
        rows = np.concatenate([np.arange(lo, min(lo + piece, n)) for lo in starts])
        X, at = np.empty((len(rows), d), dtype=np.float32), 0
        raw = _raw_chunks(ds, piece) and not np.any(starts % piece)
        for lo in starts:
            hi = min(lo + piece, n)
            if raw:  # the chunk's bytes as stored: a quarter of read_direct's time per piece
                X[at:at + hi - lo] = np.frombuffer(ds.id.read_direct_chunk((int(lo), 0))[1], "<f4", (hi - lo) * d
                                                   ).reshape(hi - lo, d)
            else:
                ds.read_direct(X, np.s_[lo:hi], np.s_[at:at + hi - lo])
            at += hi - lo
        return rows, X

    def close(self):
        self.h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _raw_chunks(ds, piece):
    """Whether each piece of `ds` is one whole chunk stored as plain little-endian float32 (no filter)."""
    return (ds.chunks == (piece, ds.shape[1]) and ds.dtype == np.dtype("<f4")
            and ds.id.get_create_plist().get_nfilters() == 0)


def _fixed_width(ds):
    """A text column as a numpy str array (fixed width), read in blocks of rows."""
    parts = [np.asarray(ds.asstr()[lo:lo + _TEXT_ROWS], dtype=str) for lo in range(0, ds.shape[0], _TEXT_ROWS)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=str)


def _text_rows(ds, rows):
    """The strings of `rows` (increasing indices) of a text column."""
    rows = np.asarray(rows, dtype=np.int64)
    return list(ds.asstr()[rows]) if len(rows) else []


def _explain_missing(path):
    """No file at `path`: say how far an interrupted extraction got, or that there is none."""
    from .partial import partial_path, partial_progress  # partial.py builds on this module

    if partial_path(path).exists():
        done, total = partial_progress(path)
        if done is None:
            raise IncompleteCacheError(f"{path}: not finished ({partial_path(path)} was cut off before its first "
                                       "batch); re-run the same `make extract` command")
        raise IncompleteCacheError(f"{path}: extraction stopped after {done} of {total} images; "
                                   "re-run the same `make extract` command to resume it")
    raise CacheError(f"{path}: no such feature cache; run `make extract` first")


def codes_key(settings):
    """A digest of a cache key without its layers: equal for caches of the same data, splits and codes."""
    rest = {k: v for k, v in settings.items() if k != "layers"} if isinstance(settings, dict) else settings
    return hashlib.sha256(json.dumps(rest, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def split_key(split):
    """A digest of each row's split, in row order: equal for caches of the same data (codes_key) that put
    every image in the same split; a rebuild that draws the splits again differs."""
    return hashlib.sha256(np.asarray(split, dtype="S8").tobytes()).hexdigest()  # train | val | test: ASCII


def read_cache_identity(path):
    """(when a finished cache was made, codes_key of its settings, split_key of its rows, {split: rows}), or
    None if it is not there or unreadable."""
    try:
        with h5py.File(path, "r") as h5:
            if h5.attrs.get("format") != CACHE_FORMAT:
                return None
            created, settings = (from_attr(h5.attrs[key]) for key in ("created", "settings"))
            split = _fixed_width(h5["split"])
    except (OSError, KeyError, TypeError, ValueError):
        return None
    sizes = {name: int(np.count_nonzero(split == name)) for name in ("train", "val", "test")}
    return str(created), codes_key(settings), split_key(split), sizes


def read_cache_settings(path):
    """The settings a finished cache was made with, or None if it is unreadable or of another format."""
    found = _finished_attrs(path, "settings")
    return None if found is None else found[0]


def _finished_attrs(path, *keys):
    """The parsed attributes `keys` of a finished cache, or None if it is unreadable, of another format or
    lacks one."""
    try:
        with h5py.File(path, "r") as h5:
            if h5.attrs.get("format") != CACHE_FORMAT:
                return None
            return [from_attr(h5.attrs[key]) for key in keys]
    except (OSError, KeyError):
        return None
