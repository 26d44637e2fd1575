import math

import pytest
import torch
import torch.nn.functional as F

from metarun.errors import MetarunError
from metarun.heads.r2d2 import R2D2Head, r2d2_logits
from tests.heads.episodes import clustered


def primal_r2d2(support, support_y, query, n_way, lambda_reg, alpha, beta):
    """alpha * [Q, 1] (X'^T X' + lambda I)^-1 X'^T Y + beta with X' = [X, 1], for one task."""
    support, query = F.pad(support, (0, 1), value=1.0), F.pad(query, (0, 1), value=1.0)
    targets = F.one_hot(support_y, n_way).to(support.dtype)
    eye = torch.eye(support.shape[-1], dtype=support.dtype)
    weight = torch.linalg.solve(support.T @ support + lambda_reg * eye, support.T @ targets)
    return alpha * query @ weight + beta


@pytest.mark.parametrize("k_shot, dim", [(1, 32), (5, 64), (5, 16)])  # N*K < D and N*K > D
def test_r2d2_kernel_solution_equals_primal_solution(k_shot, dim):
    support, support_y, query, _ = clustered(n_tasks=3, k_shot=k_shot, dim=dim)
    head = R2D2Head(lambda_init=3.0, alpha_init=2.5, beta_init=0.5).double()
    logits = head(support, support_y, query, 5)
    lambda_reg, alpha, beta = head.lambda_reg.item(), head.alpha.item(), head.beta.item()
    assert math.isclose(lambda_reg, 3.0, rel_tol=1e-6) and (alpha, beta) == (2.5, 0.5)
    for t in range(3):
        expected = primal_r2d2(support[t], support_y[t], query[t], 5, lambda_reg, alpha, beta)
        torch.testing.assert_close(logits[t], expected, atol=1e-12, rtol=0)


def test_r2d2_without_intercept_is_plain_ridge_regression():
    support, support_y, query, _ = clustered(n_tasks=1, k_shot=5, dim=32)
    head = R2D2Head(lambda_init=3.0, alpha_init=1.0, intercept=False).double()
    logits = head(support, support_y, query, 5)
    targets = F.one_hot(support_y[0], 5).double()
    eye = torch.eye(32, dtype=torch.float64)
    weight = torch.linalg.solve(
        support[0].T @ support[0] + head.lambda_reg * eye, support[0].T @ targets
    )
    torch.testing.assert_close(logits[0], query[0] @ weight, atol=1e-12, rtol=0)


def test_r2d2_gradient_reaches_lambda_alpha_beta_and_embeddings():
    support, support_y, query, _ = clustered(n_tasks=2, n_way=3, k_shot=2, n_query=2, dim=5)
    scalars = [torch.tensor(v, dtype=torch.float64) for v in (0.7, 1.5, 0.2)]  # lambda, alpha, beta
    inputs = [x.requires_grad_() for x in (support, query, *scalars)]

    def logits(support, query, lambda_reg, alpha, beta):
        return r2d2_logits(support, support_y, query, 3, lambda_reg, alpha, beta)

    assert torch.autograd.gradcheck(logits, inputs)


def test_r2d2_head_parameters_get_gradients_except_beta_through_cross_entropy():
    support, support_y, query, query_y = clustered(k_shot=5, dim=16, dtype=torch.float32)
    head = R2D2Head(alpha_init=1.0)
    assert sorted(name for name, _ in head.named_parameters()) == ["alpha", "beta", "log_lambda"]
    logits = head(support, support_y, query, 5)
    F.cross_entropy(logits.flatten(0, 1), query_y.flatten()).backward()
    assert head.log_lambda.grad.abs() > 0 and head.alpha.grad.abs() > 0
    # beta shifts every logit alike: the softmax, and so the loss, does not see it.
    assert head.beta.grad.abs() < 1e-6
    head.zero_grad()
    head(support, support_y, query, 5)[..., 0].sum().backward()
    assert head.beta.grad == 4 * 75


def test_r2d2_fixed_lambda_is_a_buffer_with_the_initial_value():
    head = R2D2Head(lambda_init=50.0, learn_lambda=False)
    assert sorted(name for name, _ in head.named_parameters()) == ["alpha", "beta"]
    assert math.isclose(head.lambda_reg.item(), 50.0, rel_tol=1e-6)


@pytest.mark.parametrize("k_shot", [1, 5])
def test_r2d2_batched_equals_each_task_alone(k_shot):
    support, support_y, query, _ = clustered(n_tasks=4, k_shot=k_shot, dim=24, seed=3)
    head = R2D2Head(alpha_init=1.0).double()
    batched = head(support, support_y, query, 5)
    alone = torch.cat(
        [head(support[t : t + 1], support_y[t : t + 1], query[t : t + 1], 5) for t in range(4)]
    )
    torch.testing.assert_close(batched, alone, atol=1e-12, rtol=0)


@pytest.mark.parametrize("k_shot", [1, 5])
def test_r2d2_logits_have_query_shape_and_beat_chance(k_shot):
    support, support_y, query, query_y = clustered(k_shot=k_shot, dim=32, dtype=torch.float32)
    logits = R2D2Head()(support, support_y, query, 5)
    assert logits.shape == (4, 75, 5) and logits.dtype == torch.float32
    assert (logits.argmax(dim=-1) == query_y).float().mean() > 0.9


def test_r2d2_promotes_bf16_embeddings_to_float32():
    support, support_y, query, _ = clustered(k_shot=5, dim=16, dtype=torch.float32)
    logits = R2D2Head(alpha_init=1.0)(support.bfloat16(), support_y, query.bfloat16(), 5)
    assert logits.dtype == torch.float32


@pytest.mark.parametrize(
    "options, key",
    [({"lambda_init": 0.0}, "head.lambda_init"), ({"alpha_init": 0.0}, "head.alpha_init")],
)
def test_r2d2_bad_options_raise_one_line_naming_the_key(options, key):
    with pytest.raises(MetarunError, match=rf"^{key}=.*; set {key}=") as err:
        R2D2Head(**options)
    assert "\n" not in str(err.value)
