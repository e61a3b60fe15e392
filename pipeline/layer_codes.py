"""One cached layer as stage two reads it: in memory when it fits the budget, else
streamed from the HDF5 cache in blocks (in chunk order, or of chunks drawn at random
for training).

    codes = CachedLayer("features/vehicles/x.h5", "penultimate", memory_budget=2 * 2**30)
    scaler = codes.scaler("train", "val")                    # mean and scale in one pass
    for X, y in codes.batches(("train", "val"), scaler, 4096, seed=0): ...   # standardised float32
    for rows, X in codes.blocks(("test",), scaler): ...                     # in row order

Peak memory of a streamed layer is a few blocks of 64 MiB, whatever N is.
"""
import os
from dataclasses import dataclass

import numpy as np

from .checks import data_checks
from .errors import CacheError
from .store import FeatureCache

SPLITS = ("train", "val", "test")
BUDGET_SHARE = 0.25   # of physical memory: the default budget for one layer in memory
IN_MEMORY_COPIES = 3  # the raw codes, a standardised copy, and working space
BLOCK_BYTES = 64 * 2**20  # codes read at a time when streaming


def default_memory_budget():
    """A quarter of this machine's memory, in bytes."""
    return int(BUDGET_SHARE * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


@dataclass
class Scaler:
    """Standardisation as scikit-learn's StandardScaler: (x - mean) / scale, scale 1 where a feature is constant."""
    mean: np.ndarray   # float64 [D]
    scale: np.ndarray  # float64 [D]

    @classmethod
    def from_sums(cls, n, total, squares):
        mean = total / n
        var = np.maximum(squares / n - mean ** 2, 0.0)
        scale = np.sqrt(var)
        return cls(mean, np.where(scale < 1e-12 * np.maximum(np.abs(mean), 1.0), 1.0, scale))

    def __call__(self, X):
        """Standardised float32 copy of X: one new array (float32 arithmetic), no temporaries."""
        return self.in_place(np.array(X, dtype=np.float32))

    def in_place(self, X):
        """X, a float32 array of the caller's own (a fancy-indexed copy), standardised in place -> X: no new
        memory, whose first touch (a page fault per page) costs more than the arithmetic."""
        X -= self.mean.astype(np.float32)
        X /= self.scale.astype(np.float32)
        return X


class CachedLayer:
    """The codes of one layer of a finished cache, its labels and splits, and the cache's word on them."""
    block_bytes = BLOCK_BYTES

    def __init__(self, path, layer, memory_budget=None):
        with FeatureCache(path) as cache:
            self.layer = resolve_layer(cache, layer)
            self.path, self.labels, self.split = str(path), cache.labels, cache.split
            self.class_names, self.attrs = cache.class_names, cache.attrs
            self.depth = cache.layer_attrs(self.layer).get("depth")
            self.checks = data_checks(cache)
            self.n, self.d = cache.h5["layers"][self.layer].shape
        budget = default_memory_budget() if memory_budget is None else memory_budget
        self.in_memory = self.n * self.d * 4 * IN_MEMORY_COPIES <= budget
        self.X = self._read_all() if self.in_memory else None

    def _read_all(self):
        with FeatureCache(self.path) as cache:
            X = cache.features(self.layer)[0]
        step = max(1, BLOCK_BYTES // (4 * self.d))
        for lo in range(0, self.n, step):
            self._refuse_non_finite(lo, X[lo:lo + step])
        return X

    def _refuse_non_finite(self, lo, X):
        """NaN or inf codes (fp16 overflow, a damaged file) make every fit fail or guess: refused, by row."""
        bad = ~np.isfinite(X).all(axis=1)
        if bad.any():
            at = self.ids_of(np.array([lo + int(np.argmax(bad))]))[0]
            raise CacheError(f"{self.path}: layer {self.layer} holds codes that are NaN or inf (first: {at}), which no "
                             f"head can fit; extract it again with REBUILD=1 (it was made in "
                             f"{self.attrs.get('precision', 'an unrecorded precision')}; fp16 can overflow: "
                             "PRECISION=fp32 or bf16)")

    def ids_of(self, rows):
        """The ids of `rows` (increasing indices), read from the cache: ids are not kept in memory."""
        with FeatureCache(self.path) as cache:
            return cache.ids_of(rows)

    def rows(self, *splits):
        """Indices of the rows in `splits`, in cache order."""
        return np.flatnonzero(np.isin(self.split, splits))

    def _blocks(self):
        """(first row, raw codes [B, D]) over the whole layer: slices of X, or blocks read from the cache."""
        if self.in_memory:
            step = max(1, self.block_bytes // (4 * self.d))
            yield from ((lo, self.X[lo:lo + step]) for lo in range(0, self.n, step))
            return
        with FeatureCache(self.path) as cache:
            for lo, X in cache.blocks(self.layer, self.block_bytes):
                self._refuse_non_finite(lo, X)  # in memory: when read
                yield lo, X

    def scaler(self, *splits):
        """The Scaler of the rows in `splits`, from one pass (float64 sums)."""
        wanted = np.isin(self.split, splits)
        total, squares = np.zeros(self.d), np.zeros(self.d)
        for lo, X in self._blocks():
            part = np.asarray(X[wanted[lo:lo + len(X)]], dtype=np.float64)
            total += part.sum(axis=0)
            squares += (part * part).sum(axis=0)
        return Scaler.from_sums(int(wanted.sum()), total, squares)

    def matrix(self, rows, scaler):
        """Standardised codes of `rows` (increasing indices) [len(rows), D], gathered in one pass."""
        if self.in_memory:
            return scaler.in_place(self.X[rows])
        out, at = np.empty((len(rows), self.d), dtype=np.float32), 0
        for lo, X in self._blocks():
            take = rows[(rows >= lo) & (rows < lo + len(X))]
            out[at:at + len(take)] = scaler.in_place(X[take - lo])
            at += len(take)
        return out

    def blocks(self, splits, scaler):
        """(row indices, standardised codes) of the rows in `splits`, block by block, in row order."""
        wanted = np.isin(self.split, splits)
        for lo, X in self._blocks():
            keep = np.flatnonzero(wanted[lo:lo + len(X)])
            if len(keep):
                yield lo + keep, scaler.in_place(X[keep])

    def batches(self, splits, scaler, batch_size, seed):
        """Shuffled minibatches (standardised X [B, D], y [B]) of the rows in `splits`, one epoch. In
        memory: a permutation of the rows; streamed: blocks of pieces drawn at random from the whole
        layer, rows shuffled within each (a class-sorted cache read in row order biases the fit)."""
        rng = np.random.default_rng(seed)
        if self.in_memory:
            rows = rng.permutation(self.rows(*splits))
            for lo in range(0, len(rows), batch_size):
                take = np.sort(rows[lo:lo + batch_size])
                yield scaler.in_place(self.X[take]), self.labels[take]
            return
        wanted = np.isin(self.split, splits)
        with FeatureCache(self.path) as cache:
            piece, per_block = cache.pieces(self.layer, self.block_bytes)
            fitting = np.flatnonzero(wanted)
            pieces, first = np.unique(fitting // piece, return_index=True)  # pieces with wanted rows, read only those
            order = spread_by_class(self.labels[fitting[first]], rng)
            for lo in range(0, len(order), per_block):
                rows, X = cache.read_pieces(self.layer, pieces[order[lo:lo + per_block]] * piece, piece)
                keep = wanted[rows]
                rows, X, mix = rows[keep], scaler.in_place(X[keep]), rng.permutation(int(keep.sum()))
                for at in range(0, len(rows), batch_size):
                    take = mix[at:at + batch_size]
                    yield X[take], self.labels[rows[take]]


def spread_by_class(labels, rng):
    """A random order of pieces (`labels`: each piece's first wanted row's class) in which each class's pieces are
    spread evenly (a class's k-th of m pieces near (k + u) / m of the way): a class-sorted cache's blocks
    then hold every class in proportion, not a few classes each (its pieces are each of one class)."""
    position = np.empty(len(labels))
    for label in np.unique(labels):
        mine = np.flatnonzero(labels == label)
        position[rng.permutation(mine)] = (np.arange(len(mine)) + rng.random(len(mine))) / len(mine)
    return np.argsort(position, kind="stable")


def resolve_layer(cache, layer):
    """A cache layer by exact name, `penultimate`, or a bare spatial tap as extract names it: `tap:avg`."""
    if layer in cache.layers:
        return layer
    if layer == "penultimate" and cache.attrs.get("penultimate") in cache.layers:
        return cache.attrs["penultimate"]
    if f"{layer}:avg" in cache.layers:
        return f"{layer}:avg"
    pooled = [name for name in cache.layers if name.split(":")[0] == layer]
    if pooled:
        raise CacheError(f"{cache.path}: no layer {layer!r} (a tap alone means {layer}:avg); it has "
                         f"{', '.join(pooled)}: give LAYER={pooled[0]}, "
                         f"or `make extract LAYERS={layer}` (with this cache's DATASET, MODEL and WEIGHTS) "
                         f"for {layer}:avg")
    raise CacheError(f"{cache.path}: no layer {layer!r}; it has {', '.join(cache.layers)} (extract it with "
                     f"`make extract LAYERS={layer}` and this cache's DATASET, MODEL and WEIGHTS)")
