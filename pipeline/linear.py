"""Linear heads for every C at once, in torch: one matmul scores all of them.

    fit = fit_full_batch(X, y, n_classes, Cs=[1e-4, ..., 1e2], loss="softmax")   # L-BFGS per C, X in memory
    fit = fit_minibatch(batches, n, d, n_classes, Cs, loss="svm", epochs=10)     # Adam, X streamed
    scores = grid_scores(fit, X)                                                  # [N, G, K]

The weights of the G values of C sit side by side, [D, G*K], so one pass over
streamed minibatches trains (and one pass scores) every C, as DINOv2's linear
evaluation does: Adam's per-weight step sizes let each C's head move at its own pace.
In memory, full-batch L-BFGS solves each C in its own run instead, along the path
(each C starts from the previous one's solution, as scikit-learn's regularisation
paths): one run for the whole grid shares one curvature history and one line search
between problems of very different conditioning, and leaves the weakly regularised
heads short of their optimum, which flatters them on validation. Each C gets the
minimiser of its own objective (to within 1e-4 of it over a stretch of 25 iterations),
the one scikit-learn's estimators minimise (C means the same):

    softmax   mean_i cross-entropy + ||W||^2 / (2 C n)               (LogisticRegression)
    svm       mean_i sum_k squared hinge(y_ik (w_k x_i + b_k))
                                       + (||W||^2 + ||b||^2) / (2 C n)  (LinearSVC, one-vs-rest)

For two classes each C has one output, class 1 when positive, as scikit-learn's
binary heads (a softmax over two outputs would halve the penalty: another C). The
svm's intercept is penalised as LinearSVC penalises it (a constant feature of 1),
the softmax's is not (as LogisticRegression). Features must be standardised by the
caller.
"""
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

LOSSES = ("softmax", "svm")
MAX_ITER = 200        # L-BFGS iterations of one C's run
GRAD_TOL = 1e-6       # ... or stop when every gradient entry is below this
CHUNK = 25            # ... or when CHUNK iterations lowered the objective
REL_TOL = 1e-4        # ... by less than this fraction of it


@dataclass
class GridFit:
    """Fitted heads for each C: coef [G, K, D], intercept [G, K]."""
    Cs: list
    coef: np.ndarray
    intercept: np.ndarray
    steps: int            # L-BFGS iterations, or minibatch steps

    def pick(self, C):
        """The fit at one C -> (coef [K, D], intercept [K])."""
        g = self.Cs.index(C)
        return self.coef[g], self.intercept[g]


class Grid(torch.nn.Module):
    """G linear heads of K classes over D features: x [N, D] -> scores [N, G, K]."""

    def __init__(self, d, k, g, coef=None, intercept=None):
        super().__init__()
        self.g, self.k = g, k
        weight = torch.zeros(d, g * k) if coef is None else torch.tensor(coef).permute(2, 0, 1).reshape(d, g * k)
        bias = torch.zeros(g * k) if intercept is None else torch.tensor(intercept).reshape(g * k)  # copies: a
        # warm start's arrays must not change under the optimiser
        self.weight = torch.nn.Parameter(weight.float().contiguous())
        self.bias = torch.nn.Parameter(bias.float().contiguous())

    def forward(self, x):
        return (_Project.apply(x, self.weight) + self.bias).view(-1, self.g, self.k)

    def penalty(self, Cs, n, loss):
        """sum over C of ||W_C||^2 / (2 C n); the svm's intercept counts in W_C, as in LinearSVC."""
        norms = self.weight.view(-1, self.g, self.k).pow(2).sum(dim=(0, 2))  # [G]
        if loss == "svm":
            norms = norms + self.bias.view(self.g, self.k).pow(2).sum(dim=1)
        return (norms / (2.0 * Cs * n)).sum()

    def result(self, Cs, steps):
        d = self.weight.shape[0]
        coef = self.weight.detach().view(d, self.g, self.k).permute(1, 2, 0).cpu().numpy()  # [G, K, D]
        return GridFit(list(Cs), coef.copy(), self.bias.detach().view(self.g, self.k).cpu().numpy().copy(), steps)


class _Project(torch.autograd.Function):
    """x @ w for data x (no gradient) and weights w, whose gradient is computed as (g.T @ x).T: MKL's
    x.T @ g takes 20 times longer for some skinny shapes on some CPUs (README, bench-heads)."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x)
        return x @ w

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return None, (grad.T @ x).T


def outputs(n_classes):
    """Scores per head: one for two classes (as scikit-learn's binary heads: class 1 when positive), else K."""
    return 1 if n_classes == 2 else n_classes


def class_scores(scores):
    """[N, G, K] scores of every class; a binary head's z as (-z/2, z/2): same argmax and softmax as sigmoid(z)."""
    return np.concatenate([-scores / 2, scores / 2], axis=2) if scores.shape[2] == 1 else scores


def mean_loss(scores, y, loss):
    """sum over C of the mean loss over rows; scores [N, G, K] (or [N, G, 1] for two classes), y [N]."""
    if scores.shape[2] == 1:  # binary: logistic or squared hinge on z, target sign t = +1 for class 1
        margin = (2.0 * y - 1.0).view(-1, 1) * scores[:, :, 0]  # [N, G]
        per_row = torch.nn.functional.softplus(-margin) if loss == "softmax" else (1 - margin).clamp(min=0).pow(2)
        return per_row.mean(dim=0).sum()
    if loss == "softmax":
        true = scores.gather(2, y.view(-1, 1, 1).expand(-1, scores.shape[1], 1)).squeeze(2)  # [N, G]
        return (scores.logsumexp(dim=2) - true).mean(dim=0).sum()
    sign = torch.full_like(scores, -1.0).scatter_(2, y.view(-1, 1, 1).expand(-1, scores.shape[1], 1), 1.0)
    return (1.0 - sign * scores).clamp(min=0).pow(2).sum(dim=2).mean(dim=0).sum()


def fit_full_batch(X, y, n_classes, Cs, loss, warm=None, max_iter=MAX_ITER, device="cpu", progress=None,
                   rel_tol=REL_TOL):
    """Each C in turn by its own full-batch L-BFGS run (strong Wolfe line search, at most `max_iter`
    iterations) on X [N, D] float32 in memory. A run starts from `warm`'s head at its C when `warm` (a
    GridFit of the same Cs) is given, else from the previous C's solution: give Cs in increasing order.
    `progress(rows)` is called at each pass over X."""
    X = torch.as_tensor(X, device=device)
    y = torch.as_tensor(np.asarray(y), device=device)
    coef, intercept, steps, start = [], [], 0, (None, None)
    for g, C in enumerate(Cs):
        if warm is not None:
            start = (warm.coef[g:g + 1], warm.intercept[g:g + 1])
        model = Grid(X.shape[1], outputs(n_classes), 1, *start).to(device)
        steps += _lbfgs(model, X, y, C, loss, max_iter, progress, rel_tol)
        fit = model.result([C], 0)
        start = (fit.coef, fit.intercept)
        coef.append(fit.coef[0])
        intercept.append(fit.intercept[0])
    return GridFit(list(Cs), np.stack(coef), np.stack(intercept), steps)


def _lbfgs(model, X, y, C, loss, max_iter, progress, rel_tol):
    """Minimise one C's objective over `model` (a Grid of one head) in place -> the iterations it took.
    Runs in stretches of CHUNK iterations (L-BFGS keeps its history between them) and stops early when
    a stretch lowered the objective by less than `rel_tol` of it: the slow tail of a weakly regularised C."""
    C = torch.tensor([C], dtype=torch.float32, device=X.device)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=CHUNK, history_size=20, tolerance_grad=GRAD_TOL,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe",
                                  max_eval=10 * CHUNK)  # a stretch ends by its iterations, not its evaluations

    def objective():
        optimizer.zero_grad(set_to_none=True)
        value = mean_loss(model(X), y, loss) + model.penalty(C, len(y), loss)
        value.backward()
        if progress:
            progress(len(y))
        return value

    state, group = optimizer.state[optimizer._params[0]], optimizer.param_groups[0]
    while True:
        done = state.get("n_iter", 0)
        group["max_iter"] = min(CHUNK, max_iter - done)
        start = float(optimizer.step(objective).detach())  # the objective where this stretch starts
        if state["n_iter"] - done < group["max_iter"] or state["n_iter"] >= max_iter:
            return state["n_iter"]  # converged by the gradient's tolerance, or out of iterations
        if start - state["prev_loss"] < rel_tol * abs(state["prev_loss"]):  # prev_loss: at the last iteration's start
            return state["n_iter"]


def epochs_for(n, batch_size, epochs, min_steps):
    """`epochs`, or more when n is small: every fit gets at least `min_steps` steps."""
    return max(epochs, -(-min_steps // -(-n // batch_size)))


def shuffled(X, y, batch_size, seed):
    """A function giving one epoch of (X, y) minibatches of arrays in memory, reshuffled at each call."""
    rng = np.random.default_rng(seed)

    def epoch():
        order = rng.permutation(len(y))
        return ((X[order[lo:lo + batch_size]], y[order[lo:lo + batch_size]]) for lo in range(0, len(y), batch_size))
    return epoch


def fit_minibatch(batches, n, d, n_classes, Cs, loss, epochs, lr=1e-2, device="cpu", progress=None):
    """Every C at once by Adam on minibatches: `batches()` yields (X [B, D] float32, y [B]) over the
    n fitting rows once per call (one epoch, in any order); the learning rate decays to 0 (cosine)."""
    model = Grid(d, outputs(n_classes), len(Cs)).to(device)
    Cs_t = torch.as_tensor(Cs, dtype=torch.float32, device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps, schedule = 0, None
    for epoch in range(epochs):
        for X, y in batches():
            if schedule is None:  # the number of steps is known once the first epoch's batch size is
                total = epochs * -(-n // len(y))
                schedule = torch.optim.lr_scheduler.LambdaLR(
                    optimizer, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, total) / total)))
            X, y = torch.as_tensor(X, device=device), torch.as_tensor(np.asarray(y), device=device)
            with _threads_for(torch.device(device), X.numel() * len(Cs) * outputs(n_classes)):
                value = mean_loss(model(X), y, loss) + model.penalty(Cs_t, n, loss)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
            schedule.step()
            steps += 1
            if progress:
                progress(len(y))
    return model.result(Cs, steps)


@torch.inference_mode()
def grid_scores(fit, X, device="cpu"):
    """Scores [N, G, K] of every class by every C's head on X [N, D] (standardised as for the fit)."""
    model = Grid(fit.coef.shape[2], fit.coef.shape[1], len(fit.Cs), fit.coef, fit.intercept).to(device)
    return class_scores(model(torch.as_tensor(X, device=device)).cpu().numpy())


@contextmanager
def _threads_for(device, work_per_step):
    """One CPU thread for small steps: thread start-up costs more than the matmul, and
    with other processes on the cores (decode workers, a second job) it is many times slower."""
    if device.type != "cpu" or work_per_step > 5_000_000:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
