import math

import pytest
import torch

from metarun.evaluation import confidence_interval


def test_confidence_interval_is_196_sample_std_over_sqrt_n():
    accuracies = torch.tensor([0.6, 0.8, 1.0, 0.8], dtype=torch.float64)
    mean, ci95 = confidence_interval(accuracies)
    std = math.sqrt(((0.6 - 0.8) ** 2 + 0 + (1.0 - 0.8) ** 2 + 0) / 3)  # sample std, n - 1
    assert mean == pytest.approx(0.8, abs=1e-12)
    assert ci95 == pytest.approx(1.96 * std / 2, abs=1e-12)
