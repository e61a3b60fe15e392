"""linear.py: every C at once equals a fit per C, and the objectives are scikit-learn's."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from pipeline.linear import epochs_for, fit_full_batch, fit_minibatch, grid_scores, mean_loss, shuffled
from test_heads import blobs

CS = [1e-3, 1e-1, 10.0]


@pytest.fixture(scope="module")
def data():
    X, y = blobs(n_per_class=80, dim=12, classes=3, spread=0.6, seed=5)
    return StandardScaler().fit_transform(X).astype(np.float32), y


@pytest.mark.parametrize("loss", ["softmax", "svm"])
def test_all_C_at_once_equals_one_fit_per_C(data, loss):
    X, y = data
    together = fit_full_batch(X, y, 3, CS, loss, max_iter=500)
    for C in CS:  # float32 L-BFGS settles to about 1e-3 of the coefficients' scale
        alone = fit_full_batch(X, y, 3, [C], loss, max_iter=500)
        np.testing.assert_allclose(together.pick(C)[0], alone.pick(C)[0], rtol=1e-2, atol=1e-3)
        np.testing.assert_allclose(together.pick(C)[1], alone.pick(C)[1], rtol=1e-2, atol=1e-3)
        together_says = grid_scores(together, X)[:, CS.index(C)].argmax(1)
        assert (together_says == grid_scores(alone, X)[:, 0].argmax(1)).mean() >= 0.99


def objective(fit, C, X, y, loss):
    """C's objective at its fitted head, in float64."""
    coef, intercept = (a.astype(np.float64) for a in fit.pick(C))
    scores = torch.as_tensor(X, dtype=torch.float64) @ torch.as_tensor(coef.T) + torch.as_tensor(intercept)
    norm = (coef ** 2).sum() + ((intercept ** 2).sum() if loss == "svm" else 0.0)
    return float(mean_loss(scores[:, None, :], torch.as_tensor(y), loss)) + norm / (2 * C * len(y))


def correlated_codes(n=600, d=128, k=4, latent=16, seed=0):
    """ReLU codes of a few latent factors, standardised: correlated features, a slow tail for L-BFGS."""
    rng = np.random.default_rng(seed)
    means, y = rng.normal(0, 0.6, (k, latent)), rng.integers(0, k, n)
    X = np.maximum((means[y] + rng.normal(0, 1, (n, latent))) @ rng.normal(0, 1, (latent, d))
                   + rng.normal(0, 0.3, (n, d)), 0)
    return StandardScaler().fit_transform(X).astype(np.float32), y


@pytest.mark.parametrize("loss", ["softmax", "svm"])
@pytest.mark.parametrize("codes", ["separable", "correlated"])
def test_weak_regularisation_reaches_its_optimum(loss, codes):
    """Separable (more dims than rows, as a small real layer) and correlated codes (whose weak Cs creep
    to their optimum): every C of a grid up to 100 ends within 1e-3 of its own optimum, as a long fit of
    that C alone run to the gradient's tolerance, so validation never sees a flattering half-fitted head."""
    if codes == "separable":
        X, y = blobs(n_per_class=30, dim=120, classes=3, spread=1.5, seed=7)
        X = StandardScaler().fit_transform(X).astype(np.float32)
    else:
        X, y = correlated_codes()
    k = len(np.unique(y))
    grid = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]
    fit = fit_full_batch(X, y, k, grid, loss, max_iter=2000)  # the early stop ends these runs, not the cap
    for C in grid:
        alone = fit_full_batch(X, y, k, [C], loss, max_iter=5000, rel_tol=0)
        assert objective(fit, C, X, y, loss) <= objective(alone, C, X, y, loss) * (1 + 1e-3)


def test_a_warm_start_is_not_changed_by_the_fit_it_starts(data):
    X, y = data
    start = fit_full_batch(X, y, 3, [0.01], "svm", max_iter=500)
    before = (start.coef.copy(), start.intercept.copy())
    fit_full_batch(X, y, 3, [10.0], "svm", warm=start, max_iter=500)
    np.testing.assert_array_equal(start.coef, before[0])
    np.testing.assert_array_equal(start.intercept, before[1])


def test_softmax_is_logistic_regression_at_the_same_C(data):
    X, y = data
    fit = fit_full_batch(X, y, 3, CS, "softmax", max_iter=500)
    for C in CS:
        exact = LogisticRegression(C=C, tol=1e-8, max_iter=5000).fit(X, y)
        coef, intercept = fit.pick(C)
        np.testing.assert_allclose(coef - coef.mean(0), exact.coef_ - exact.coef_.mean(0), rtol=1e-2, atol=1e-3)
        assert (grid_scores(fit, X)[:, CS.index(C)].argmax(1) == exact.predict(X)).mean() >= 0.99


def test_svm_is_a_one_vs_rest_squared_hinge_svm_at_the_same_C(data):
    X, y = data
    fit = fit_full_batch(X, y, 3, CS, "svm", max_iter=500)
    for C in CS:
        exact = LinearSVC(C=C, dual=True, tol=1e-8, max_iter=100_000).fit(X, y)  # intercept penalised as ours
        np.testing.assert_allclose(fit.pick(C)[0], exact.coef_, rtol=2e-2, atol=5e-3)
        np.testing.assert_allclose(fit.pick(C)[1], exact.intercept_, rtol=2e-2, atol=5e-3)
        assert (grid_scores(fit, X)[:, CS.index(C)].argmax(1) == exact.predict(X)).mean() == 1.0


def test_minibatch_reaches_the_full_batch_solution(data):
    X, y = data
    full = fit_full_batch(X, y, 3, CS, "softmax", max_iter=500)
    mini = fit_minibatch(shuffled(X, y, 32, seed=0), len(y), X.shape[1], 3, CS, "softmax",
                         epochs_for(len(y), 32, 40, 2000), lr=1e-2)
    for C in CS:
        agree = (grid_scores(full, X)[:, CS.index(C)].argmax(1) == grid_scores(mini, X)[:, CS.index(C)].argmax(1))
        assert agree.mean() >= 0.98
    np.testing.assert_allclose(mini.pick(1e-3)[0], full.pick(1e-3)[0], rtol=0.05, atol=2e-3)


def test_a_warm_start_needs_fewer_steps(data):
    X, y = data
    cold = fit_full_batch(X, y, 3, [1.0], "softmax", max_iter=500)
    warm = fit_full_batch(X, y, 3, [1.0], "softmax", warm=cold, max_iter=500)
    assert warm.steps < cold.steps
    np.testing.assert_allclose(warm.coef, cold.coef, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("loss", ["softmax", "svm"])
def test_two_classes_have_one_output_as_scikit_learn_has(loss):
    X, y = blobs(n_per_class=80, dim=12, classes=2, spread=0.4, seed=6)
    X = StandardScaler().fit_transform(X).astype(np.float32)
    fit = fit_full_batch(X, y, 2, [0.01, 1.0], loss, max_iter=500)
    assert fit.coef.shape == (2, 1, 12)
    for C in (0.01, 1.0):
        exact = (LogisticRegression(C=C, tol=1e-8, max_iter=5000) if loss == "softmax"
                 else LinearSVC(C=C, dual=True, tol=1e-8, max_iter=100_000)).fit(X, y)
        np.testing.assert_allclose(fit.pick(C)[0], exact.coef_, rtol=2e-2, atol=5e-3)
        assert (grid_scores(fit, X)[:, [0.01, 1.0].index(C)].argmax(1) == exact.predict(X)).mean() >= 0.99
