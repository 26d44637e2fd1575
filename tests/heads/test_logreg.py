import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from metarun.errors import MetarunError
from metarun.heads.logreg import LogisticRegressionHead, fit_logistic_regression
from tests.heads.episodes import clustered


@pytest.mark.parametrize("k_shot", [1, 5])
def test_logreg_matches_scikit_learn_probabilities_and_coefficients(k_shot):
    support, support_y, query, _ = clustered(n_tasks=2, k_shot=k_shot, dim=32, seed=k_shot)
    support, query = F.normalize(support, dim=-1), F.normalize(query, dim=-1)
    weight, bias = fit_logistic_regression(support, support_y, 5, C=1.0, tol=1e-10)
    head = LogisticRegressionHead(C=1.0, tol=1e-10)
    probs = head(support, support_y, query, 5).softmax(dim=-1)
    for t in range(2):
        reference = LogisticRegression(C=1.0, max_iter=100_000, tol=1e-12)
        reference.fit(support[t].numpy(), support_y[t].numpy())
        np.testing.assert_allclose(
            probs[t].numpy(), reference.predict_proba(query[t].numpy()), atol=1e-5
        )
        np.testing.assert_allclose(weight[t].numpy(), reference.coef_, atol=1e-4)
        # The intercepts are unique up to a common shift (softmax ignores it): compare centred.
        intercept = reference.intercept_ - reference.intercept_.mean()
        np.testing.assert_allclose(bias[t].numpy(), intercept, atol=1e-4)


def test_logreg_normalizes_embeddings_unless_told_not_to():
    support, support_y, query, _ = clustered(n_tasks=1, k_shot=5, dim=16)
    normalized = LogisticRegressionHead(tol=1e-10)
    raw = LogisticRegressionHead(normalize=False, tol=1e-10)
    expected = normalized(F.normalize(support, dim=-1), support_y, F.normalize(query, dim=-1), 5)
    torch.testing.assert_close(normalized(3.0 * support, support_y, 3.0 * query, 5), expected)
    assert (raw(3.0 * support, support_y, 3.0 * query, 5) - expected).abs().max() > 1e-2


@pytest.mark.parametrize("k_shot", [1, 5])
def test_logreg_batched_equals_each_task_alone(k_shot):
    support, support_y, query, _ = clustered(n_tasks=4, k_shot=k_shot, dim=24, seed=3)
    head = LogisticRegressionHead()
    batched = head(support, support_y, query, 5)
    alone = torch.cat(
        [head(support[t : t + 1], support_y[t : t + 1], query[t : t + 1], 5) for t in range(4)]
    )
    torch.testing.assert_close(batched, alone, atol=1e-12, rtol=0)


@pytest.mark.parametrize("k_shot", [1, 5])
def test_logreg_logits_have_query_shape_and_beat_chance(k_shot):
    support, support_y, query, query_y = clustered(k_shot=k_shot, dim=32, dtype=torch.float32)
    logits = LogisticRegressionHead()(support, support_y, query, 5)
    assert logits.shape == (4, 75, 5) and logits.dtype == torch.float32
    assert (logits.argmax(dim=-1) == query_y).float().mean() > 0.9


def test_logreg_float32_fit_is_close_to_float64_optimum():
    support, support_y, _, _ = clustered(k_shot=5, dim=64)
    support = F.normalize(support, dim=-1)
    weight64, _ = fit_logistic_regression(support, support_y, 5, tol=1e-10)
    weight32, _ = fit_logistic_regression(support.float(), support_y, 5)
    assert (weight32.double() - weight64).abs().max() < 1e-4


def test_logreg_promotes_bf16_and_detaches_embeddings():
    support, support_y, query, _ = clustered(k_shot=1, dim=16, dtype=torch.float32)
    support, query = support.bfloat16().requires_grad_(), query.bfloat16().requires_grad_()
    logits = LogisticRegressionHead()(support, support_y, query, 5)
    assert logits.dtype == torch.float32 and not logits.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(LogisticRegressionHead()(support, support_y, query, 5), logits)


def test_logreg_that_does_not_converge_raises_one_line_naming_the_fix():
    support, support_y, query, _ = clustered(k_shot=5, dim=32)
    with pytest.raises(
        MetarunError, match=r"did not converge in 1 Newton.*raise head\.max_iter"
    ) as err:
        LogisticRegressionHead(max_iter=1)(support, support_y, query, 5)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "options, key",
    [({"C": 0.0}, "head.C"), ({"max_iter": 0}, "head.max_iter"), ({"tol": -1.0}, "head.tol")],
)
def test_logreg_bad_options_raise_one_line_naming_the_key(options, key):
    with pytest.raises(MetarunError, match=rf"^{key}=.*; set {key}=") as err:
        LogisticRegressionHead(**options)
    assert "\n" not in str(err.value)
