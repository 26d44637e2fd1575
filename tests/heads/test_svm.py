import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from sklearn.svm import LinearSVC

from metarun.errors import MetarunError
from metarun.heads.svm import SVMHead, crammer_singer_dual, svm_logits


def _clusters(n_tasks, n_way, k_shot, n_query, dim, spread=3.0, seed=0, dtype=torch.float64):
    """Gaussian clusters, one mean per class and task: support, support_y, query, query_y."""
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(n_tasks, n_way, dim, generator=g, dtype=dtype)
    support = means.repeat_interleave(k_shot, 1)
    support = support + torch.randn(n_tasks, n_way * k_shot, dim, generator=g, dtype=dtype)
    query = means.repeat_interleave(n_query, 1)
    query = query + torch.randn(n_tasks, n_way * n_query, dim, generator=g, dtype=dtype)
    support_y = torch.arange(n_way).repeat_interleave(k_shot).expand(n_tasks, -1)
    query_y = torch.arange(n_way).repeat_interleave(n_query).expand(n_tasks, -1)
    return support, support_y, query, query_y


def _dual(support, support_y, n_way, C, dual_ridge):
    """alpha [S, N] for one task by the head's solver, float64."""
    upper = torch.nn.functional.one_hot(support_y, n_way).double()
    alpha, _ = crammer_singer_dual(
        (support @ support.T)[None], upper[None], C, dual_ridge, max_iter=50, tol=1e-10
    )
    return alpha[0]


def _scipy_dual(x, y, n_way, C, dual_ridge):
    """The same dual QP by SLSQP: min 1/2 ||alpha^T X||^2 + r/2 ||alpha||^2 - sum_i alpha_{i,y_i}
    s.t. sum_n alpha_{i,n} = 0, alpha_{i,n} <= C [n = y_i]."""
    n_support = len(y)
    gram, upper = x @ x.T, np.eye(n_way)[y]

    def objective(a):
        a = a.reshape(n_support, n_way)
        return 0.5 * np.sum((a.T @ x) ** 2) + 0.5 * dual_ridge * np.sum(a**2) - np.sum(a * upper)

    def gradient(a):
        a = a.reshape(n_support, n_way)
        return (gram @ a + dual_ridge * a - upper).ravel()

    equality = {
        "type": "eq",
        "fun": lambda a: a.reshape(n_support, n_way).sum(axis=1),
        "jac": lambda a: np.kron(np.eye(n_support), np.ones((1, n_way))),
    }
    bounds = [(None, C * b) for b in upper.ravel()]
    result = minimize(
        objective,
        np.zeros(n_support * n_way),
        jac=gradient,
        method="SLSQP",
        bounds=bounds,
        constraints=[equality],
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    assert result.success, result.message
    return result.x.reshape(n_support, n_way)


@pytest.mark.parametrize("n_way, k_shot", [(3, 1), (4, 2), (5, 2)])
@pytest.mark.parametrize("C", [0.1, 1.0])
def test_dual_solution_equals_scipy_qp_solution(n_way, k_shot, C):
    support, support_y, _, _ = _clusters(1, n_way, k_shot, 1, 8, spread=0.5, seed=n_way)
    support, support_y = support[0], support_y[0]
    alpha = _dual(support, support_y, n_way, C, dual_ridge=1.0)
    expected = _scipy_dual(support.numpy(), support_y.numpy(), n_way, C, dual_ridge=1.0)
    assert np.abs(alpha.numpy() - expected).max() < 1e-6  # measured: 1e-10 .. 7e-9
    # Both kinds of constraint are exercised: some bounds hold at the solution, some do not.
    at_bound = np.isclose(alpha.numpy(), C * np.eye(n_way)[support_y.numpy()], atol=1e-9)
    assert 0 < at_bound.sum() < at_bound.size


@pytest.mark.parametrize("C", [0.05, 1.0])
def test_primal_objective_at_the_solution_equals_minus_the_dual(C):
    # The dual with ridge r is the Crammer-Singer SVM of support features [x_i, sqrt(r) e_i]:
    # primal = 1/2 ||W||^2 + r/2 ||alpha||^2 + C sum_i max_n (1 - [n = y_i] + s_in - s_iy_i),
    # with s_in = w_n . x_i + r alpha_in. Strong duality: primal + dual = 0.
    support, support_y, _, _ = _clusters(1, 5, 2, 1, 8, spread=0.5, seed=3)
    x, y, r = support[0], support_y[0], 1.0
    alpha = _dual(x, y, 5, C, r)
    weights = alpha.T @ x  # [N, D]
    quadratic = 0.5 * weights.square().sum() + 0.5 * r * alpha.square().sum()
    scores = x @ weights.T + r * alpha  # [S, N]
    margin_loss = 1 - torch.nn.functional.one_hot(y, 5) + scores - scores.gather(1, y[:, None])
    primal = quadratic + C * margin_loss.amax(dim=1).sum()
    dual = quadratic - alpha.gather(1, y[:, None]).sum()
    assert abs(primal + dual).item() < 1e-10 * (1 + abs(dual).item())  # measured: ~1e-16


@pytest.mark.parametrize("C", [0.01, 1.0])
def test_paper_dual_limit_equals_liblinear_crammer_singer(C):
    # dual_ridge -> 0 is the paper's SVM; liblinear (scikit-learn's LinearSVC, crammer_singer, no
    # bias) solves its primal with its own method. D=16 < N*K=25: the Gram matrix is singular.
    support, support_y, _, _ = _clusters(1, 5, 5, 1, 16, spread=1.0, seed=5)
    x, y = support[0], support_y[0]
    weights = _dual(x, y, 5, C, dual_ridge=1e-9).T @ x
    svc = LinearSVC(C=C, multi_class="crammer_singer", fit_intercept=False, tol=1e-12)
    svc.set_params(max_iter=1_000_000).fit(x.numpy(), y.numpy())
    assert np.abs(weights.numpy() - svc.coef_).max() < 1e-6 * np.abs(svc.coef_).max()


def test_gradient_equals_central_finite_differences():
    # Directional derivatives along random directions (all entries move at once), so that every
    # support and query entry enters without 2 solves per entry.
    support, support_y, query, _ = _clusters(1, 3, 2, 2, 8, spread=0.5, seed=7)
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(1, 6, 3, generator=g, dtype=torch.float64)

    def loss(s, q):
        return (svm_logits(s, support_y, q, 3, 0.1, 1.0, 50, 1e-12) * weights).sum()

    s, q = support.clone().requires_grad_(), query.clone().requires_grad_()
    grad_support, grad_query = torch.autograd.grad(loss(s, q), (s, q))
    h = 1e-6
    for _ in range(4):
        d_support = torch.randn(support.shape, generator=g, dtype=torch.float64)
        d_query = torch.randn(query.shape, generator=g, dtype=torch.float64)
        for moved, analytic in [
            ((d_support, 0 * d_query), (grad_support * d_support).sum()),
            ((0 * d_support, d_query), (grad_query * d_query).sum()),
        ]:
            plus = loss(support + h * moved[0], query + h * moved[1])
            minus = loss(support - h * moved[0], query - h * moved[1])
            numeric = (plus - minus) / (2 * h)
            assert abs(analytic) > 1e-2  # the loss depends on them
            assert abs(numeric - analytic) < 1e-7  # measured: ~1e-9


@pytest.mark.parametrize("k_shot", [1, 5])
def test_batched_equals_looped(k_shot):
    support, support_y, query, _ = _clusters(4, 5, k_shot, 15, 32, spread=1.0, seed=k_shot)
    support.requires_grad_()
    head = SVMHead()
    batched = head(support, support_y, query, 5)
    (grad_batched,) = torch.autograd.grad(batched.logsumexp(-1).sum(), support)
    for t in range(4):
        alone = head(support[t : t + 1], support_y[t : t + 1], query[t : t + 1], 5)
        (grad_alone,) = torch.autograd.grad(alone.logsumexp(-1).sum(), support)
        assert (batched[t] - alone[0]).abs().max() < 1e-10  # measured: ~5e-15
        assert (grad_batched[t] - grad_alone[t]).abs().max() < 1e-10


def test_logits_shape_and_accuracy_well_above_chance_on_clusters():
    support, support_y, query, query_y = _clusters(
        3, 5, 5, 15, 32, spread=0.6, seed=11, dtype=torch.float32
    )
    head = SVMHead()
    logits = head(support, support_y, query, 5)
    assert logits.shape == (3, 75, 5) and logits.dtype == torch.float32
    accuracy = (logits.argmax(-1) == query_y).float().mean().item()
    assert accuracy > 0.8  # chance: 0.2
    with torch.no_grad():  # a test-time call; bf16 embeddings are promoted
        low = head(support.bfloat16(), support_y, query.bfloat16(), 5)
    assert low.dtype == torch.float32 and (low.argmax(-1) == query_y).float().mean() > 0.8


def test_learned_scale_multiplies_the_logits_and_gets_a_gradient():
    support, support_y, query, _ = _clusters(2, 5, 1, 3, 16, seed=2)
    head = SVMHead(scale=2.0)
    logits = head(support, support_y, query, 5)
    plain = SVMHead(learn_scale=False)(support, support_y, query, 5)
    assert (logits - 2.0 * plain).abs().max() < 1e-12
    logits.sum().backward()
    assert abs(head.scale.grad.item() - plain.sum().item()) < 1e-9


def test_non_convergence_raises_one_line_error():
    support, support_y, query, _ = _clusters(2, 5, 5, 3, 16, spread=1.0, seed=4)
    with pytest.raises(
        MetarunError, match=r"did not converge in 2 iterations .*raise head\.max_iter"
    ):
        SVMHead(max_iter=2)(support, support_y, query, 5)
    SVMHead(max_iter=50)(support, support_y, query, 5)  # the same episode with the default


@pytest.mark.parametrize(
    "option", [{"C": 0.0}, {"dual_ridge": 0.0}, {"tol": -1.0}, {"scale": 0.0}, {"max_iter": 0}]
)
def test_bad_options_raise_one_line_errors(option):
    (key,) = option
    with pytest.raises(MetarunError, match=rf"head\.{key}=.*; set head\.{key}="):
        SVMHead(**option)
