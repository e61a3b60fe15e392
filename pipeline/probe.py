"""The linear probe in torch: choose C on val, refit on train+val.

    fitted = select_and_refit("softmax", codes)   # codes: a layer_codes.CachedLayer
    fitted.model.predict(X)                        # a LinearModel on raw codes

Selection fits the whole coarse grid of C on train (a stratified subsample of
SELECT_ROWS when train is larger): by L-BFGS along the path, one C after another, or
every C in one minibatch run for `linear`; it scores every C on val in one pass, then
fits the two refinements around the best from the best's fit; ties go to the smaller C.
The refit at the chosen C uses all of train+val: full-batch L-BFGS when the layer is
in memory, minibatch Adam streamed from the cache when it is not. `linear` is
always trained by minibatch Adam (the torch nn.Linear head).
"""
import time
from dataclasses import dataclass

import numpy as np

from .hardware import resolve_device
from .heads import COARSE_GRID, FINE_STEPS, LinearModel
from .layer_codes import Scaler
from .linear import GridFit, epochs_for, fit_full_batch, fit_minibatch, grid_scores, outputs, shuffled

SELECT_ROWS = 10_000     # train rows above which C is chosen on a stratified subsample
ITER_BUDGET = 3e10       # L-BFGS iterations x rows x dims x outputs: the most work one C's run may take
MIN_ITER, MAX_ITER = 40, 500  # iterations of a run, whatever the budget: small problems are solved to convergence
MIN_BATCH, MAX_BATCH, STEPS_PER_EPOCH = 256, 4096, 100   # minibatch rows: about 100 steps an epoch
MIN_STEPS, EPOCHS, STREAMED_EPOCHS = 400, 12, 8
LOSS = {"softmax": "softmax", "svm": "svm", "linear": "softmax"}


@dataclass
class FittedHead:
    model: LinearModel       # refit on train+val at C
    C: float
    grid: dict               # {C: val accuracy}
    select_seconds: float
    fit_seconds: float
    solver: str              # what ran, in words
    select_rows: int         # train rows selection fitted on
    streamed: bool           # the refit read the layer from disk in blocks


@dataclass
class Run:
    """How one protocol runs: its seed, its device, and a progress bar to advance (or None)."""
    seed: int = 0
    device: object = "cpu"
    bar: object = None

    def phase(self, text):
        if self.bar is not None:
            self.bar.set_description(text)

    @property
    def progress(self):
        return None if self.bar is None else self.bar.update


def select_and_refit(head, codes, progress=None, seed=0, device="auto"):
    """Choose C on val and refit at it on train+val -> FittedHead. `progress`: a tqdm bar (or None),
    advanced by the rows of each pass and described by the phase; `device`: where torch fits."""
    run = Run(seed, resolve_device(device), progress)
    t0 = time.perf_counter()
    run.phase(f"{head}: C grid on train")
    rows = selection_rows(codes, seed)
    subsample = len(rows) < len(codes.rows("train"))
    raw = codes.matrix(rows, Scaler(np.zeros(codes.d), np.ones(codes.d)))  # one pass, even when streamed
    scaler = _scaler_of(raw)
    X, y, k = scaler.in_place(raw), codes.labels[rows], len(codes.class_names)
    coarse = _fit_grid(head, X, y, k, COARSE_GRID, run)
    grid = _val_accuracy(coarse, codes, scaler, run)
    best = _best(grid)
    Cs = [best * step for step in FINE_STEPS]
    run.phase(f"{head}: C around {best:.3g}")
    fine = _fit_grid(head, X, y, k, Cs, run, warm=_repeat(coarse, best, Cs))
    grid.update(_val_accuracy(fine, codes, scaler, run))
    C = _best(grid)
    del X
    t1 = time.perf_counter()
    run.phase(f"{head}: refit at C={C:.3g} on train+val")
    refit_scaler = codes.scaler("train", "val")
    warm = _rescaled(_repeat(coarse if C in coarse.Cs else fine, C, [C]), scaler, refit_scaler)
    model, solver = _refit(head, codes, C, warm, refit_scaler, run)
    what = f"{solver}; C chosen on {len(rows)} train rows" + (" (stratified subsample)" if subsample else "")
    return FittedHead(model, C, grid, t1 - t0, time.perf_counter() - t1, what, len(rows), not codes.in_memory)


def _rescaled(fit, old, new):
    """`fit` (on codes standardised by the Scaler `old`) as the same functions of codes standardised by `new`."""
    ratio = (new.scale / old.scale).astype(np.float32)             # [D]
    shift = ((new.mean - old.mean) / old.scale).astype(np.float32)  # [D]
    return GridFit(fit.Cs, fit.coef * ratio, fit.intercept + fit.coef @ shift, fit.steps)


def _repeat(fit, C, Cs):
    """A GridFit for `Cs` whose every head starts as `fit`'s head at C: a warm start."""
    coef, intercept = fit.pick(C)
    return GridFit(list(Cs), np.repeat(coef[None], len(Cs), 0), np.repeat(intercept[None], len(Cs), 0), 0)


def selection_rows(codes, seed=0, limit=None):
    """Train rows to choose C on: all of them, or a stratified subsample of `limit` (SELECT_ROWS), sorted."""
    train, limit = codes.rows("train"), limit or SELECT_ROWS
    if len(train) <= limit:
        return train
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(codes.labels[train], return_counts=True)
    take = np.maximum(1, np.round(counts * limit / len(train)).astype(int))
    picked = [rng.choice(train[codes.labels[train] == c], size=k, replace=False) for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def _scaler_of(raw):
    """The Scaler of rows in memory (float64 sums, as layer_codes.CachedLayer.scaler)."""
    raw = raw.astype(np.float64)
    return Scaler.from_sums(len(raw), raw.sum(axis=0), (raw * raw).sum(axis=0))


def _best(grid):
    return max(grid, key=lambda c: (grid[c], -c))


def _minibatch_plan(n, epochs=EPOCHS):
    """(rows per minibatch, epochs) for n fitting rows: a power of two near n / STEPS_PER_EPOCH."""
    batch = int(np.clip(2 ** round(np.log2(max(n, 1) / STEPS_PER_EPOCH)), MIN_BATCH, MAX_BATCH))
    return batch, epochs_for(n, batch, epochs, MIN_STEPS)


def iterations(n, d, k):
    """L-BFGS iterations for one C's head of k classes on n x d codes: to convergence (MAX_ITER) on small
    problems, fewer on large ones (at least MIN_ITER), where validation accuracy has settled before the gradient."""
    return int(np.clip(ITER_BUDGET / (n * d * outputs(k)), MIN_ITER, MAX_ITER))


def _fit_grid(head, X, y, k, Cs, run, warm=None):
    """Every C of `Cs` on (X, y) in memory: L-BFGS from `warm` (a GridFit of Cs), or minibatch Adam for `linear`."""
    if head != "linear":
        return fit_full_batch(X, y, k, Cs, LOSS[head], warm=warm, max_iter=iterations(len(y), X.shape[1], k),
                              device=run.device, progress=run.progress)
    batch, epochs = _minibatch_plan(len(y))
    return fit_minibatch(shuffled(X, y, batch, run.seed), len(y), X.shape[1], k, Cs, LOSS[head], epochs,
                         device=run.device, progress=run.progress)


def _val_accuracy(fit, codes, scaler, run):
    """{C: accuracy on val} of every head of `fit`, in one pass over val."""
    correct, total = np.zeros(len(fit.Cs)), 0
    for rows, X in codes.blocks(("val",), scaler):
        predicted = grid_scores(fit, X, run.device).argmax(axis=2)  # [B, G]
        correct += (predicted == codes.labels[rows][:, None]).sum(axis=0)
        total += len(rows)
    return {C: float(c / total) for C, c in zip(fit.Cs, correct)}


def _refit(head, codes, C, warm, scaler, run):
    """The head at C on all of train+val (standardised by `scaler`), from `warm` -> (LinearModel, solver in words)."""
    rows, k = codes.rows("train", "val"), len(codes.class_names)
    if codes.in_memory:
        fit = _fit_grid(head, codes.matrix(rows, scaler), codes.labels[rows], k, [C], run, warm)
        steps = f"{fit.steps} iteration{'' if fit.steps == 1 else 's'}"
        solver = "minibatch Adam" if head == "linear" else f"full-batch L-BFGS ({steps})"
    else:
        batch, epochs = _minibatch_plan(len(rows), STREAMED_EPOCHS)
        epoch = iter(range(epochs))
        fit = fit_minibatch(lambda: codes.batches(("train", "val"), scaler, batch, run.seed + next(epoch)),
                            len(rows), codes.d, k, [C], LOSS[head], epochs, device=run.device, progress=run.progress)
        solver = f"minibatch Adam streamed from the cache ({epochs} epochs)"
    coef, intercept = fit.pick(C)
    loss = {("svm", True): "squared hinge", ("svm", False): "squared hinge, one-vs-rest",
            ("softmax", True): "logistic loss", ("softmax", False): "multinomial cross-entropy"}[LOSS[head], k == 2]
    where = "" if run.device.type == "cpu" else f" on {run.device}"
    return (LinearModel(coef, intercept, scaler.mean, scaler.scale, codes.class_names),
            f"torch {loss}, {solver}{where}")
