import pytest
import torch
import torch.nn.functional as F

from metarun.errors import MetarunError
from metarun.heads.ridge import RidgeHead, ridge_weights
from tests.heads.episodes import clustered


def primal_ridge(support, targets, lambda_reg):
    """(X^T X + lambda I)^-1 X^T Y, the D x D form, for one task."""
    eye = torch.eye(support.shape[-1], dtype=support.dtype)
    return torch.linalg.solve(support.T @ support + lambda_reg * eye, support.T @ targets)


@pytest.mark.parametrize("k_shot, dim", [(1, 32), (5, 64), (5, 16)])  # N*K < D and N*K > D
def test_ridge_kernel_solution_equals_primal_solution(k_shot, dim):
    support, support_y, query, _ = clustered(n_tasks=3, k_shot=k_shot, dim=dim)
    targets = F.one_hot(support_y, 5).double()
    weight = ridge_weights(support, targets, 50.0)
    head = RidgeHead(lambda_reg=50.0, scale=2.0)
    logits = head(support, support_y, query, 5)
    for t in range(3):
        primal = primal_ridge(support[t], targets[t], 50.0)
        torch.testing.assert_close(weight[t], primal, atol=1e-12, rtol=0)
        torch.testing.assert_close(logits[t], 2.0 * query[t] @ primal, atol=1e-12, rtol=0)


def test_ridge_gradient_reaches_support_and_query_embeddings():
    support, support_y, query, _ = clustered(n_tasks=2, n_way=3, k_shot=2, n_query=2, dim=5)
    head = RidgeHead(lambda_reg=0.5)

    def logits(support, query):
        return head(support, support_y, query, 3)

    support.requires_grad_(), query.requires_grad_()
    assert torch.autograd.gradcheck(logits, (support, query))
    logits(support, query).square().sum().backward()
    assert support.grad.abs().min() > 0 and query.grad.abs().min() > 0


def test_ridge_learned_scale_is_a_parameter_with_a_gradient():
    support, support_y, query, query_y = clustered(k_shot=1, dim=16, dtype=torch.float32)
    head = RidgeHead()
    F.cross_entropy(head(support, support_y, query, 5).flatten(0, 1), query_y.flatten()).backward()
    assert [name for name, _ in head.named_parameters()] == ["scale"]
    assert head.scale.grad.abs() > 0
    assert list(RidgeHead(learn_scale=False).parameters()) == []


@pytest.mark.parametrize("k_shot", [1, 5])
def test_ridge_batched_equals_each_task_alone(k_shot):
    support, support_y, query, _ = clustered(n_tasks=4, k_shot=k_shot, dim=24, seed=3)
    head = RidgeHead()
    batched = head(support, support_y, query, 5)
    alone = torch.cat(
        [head(support[t : t + 1], support_y[t : t + 1], query[t : t + 1], 5) for t in range(4)]
    )
    torch.testing.assert_close(batched, alone, atol=1e-12, rtol=0)


@pytest.mark.parametrize("k_shot", [1, 5])
def test_ridge_logits_have_query_shape_and_beat_chance(k_shot):
    support, support_y, query, query_y = clustered(k_shot=k_shot, dim=32, dtype=torch.float32)
    logits = RidgeHead()(support, support_y, query, 5)
    assert logits.shape == (4, 75, 5) and logits.dtype == torch.float32
    assert (logits.argmax(dim=-1) == query_y).float().mean() > 0.9


def test_ridge_promotes_bf16_embeddings_to_float32():
    support, support_y, query, _ = clustered(k_shot=5, dim=16, dtype=torch.float32)
    logits = RidgeHead()(support.bfloat16(), support_y, query.bfloat16(), 5)
    expected = RidgeHead()(support.bfloat16().float(), support_y, query.bfloat16().float(), 5)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize(
    "options, key", [({"lambda_reg": 0.0}, "head.lambda_reg"), ({"scale": -1.0}, "head.scale")]
)
def test_ridge_bad_options_raise_one_line_naming_the_key(options, key):
    with pytest.raises(MetarunError, match=rf"^{key}=.*; set {key}=") as err:
        RidgeHead(**options)
    assert "\n" not in str(err.value)
