import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.func import functional_call

from metarun.algorithms.inner_loop import inner_loop
from metarun.models.layers import Classifier
from metarun.models.resnet12 import ResNet12, drop_block
from tests.conftest import one_line_error

SMALL = [8, 8, 16, 16]


@pytest.mark.parametrize(
    "in_channels, image_size, out_shape",
    [
        (1, 28, (640, 1, 1)),  # 28 -> 14 -> 7 -> 3 -> 1
        (3, 32, (640, 2, 2)),  # 32 -> 16 -> 8 -> 4 -> 2
        (3, 84, (640, 5, 5)),  # 84 -> 42 -> 21 -> 10 -> 5: MetaOptNet's 16000 features
    ],
)
def test_resnet12_feature_map_follows_image_size_at_the_real_widths(
    in_channels, image_size, out_shape
):
    torch.manual_seed(0)
    model = ResNet12(in_channels=in_channels, image_size=image_size)
    assert model.out_shape == out_shape
    assert model.out_features == out_shape[0] * out_shape[1] * out_shape[2]
    with torch.no_grad():
        assert model(torch.randn(1, in_channels, image_size, image_size)).shape == (
            1,
            model.out_features,
        )


def test_resnet12_takes_channels_as_list_tuple_or_listconfig():
    torch.manual_seed(0)
    names = list(ResNet12(image_size=16, channels=SMALL).state_dict())
    for channels in (tuple(SMALL), OmegaConf.create({"c": SMALL}).c):
        model = ResNet12(image_size=16, channels=channels)
        assert model.channels == SMALL and list(model.state_dict()) == names


def test_drop_block_is_off_in_evaluation():
    torch.manual_seed(0)
    model = ResNet12(
        in_channels=1, image_size=32, channels=SMALL, drop_rate=0.5, dropblock_size=2
    ).eval()
    x = torch.randn(4, 1, 32, 32)
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_drop_block_draws_reproducible_masks_from_the_global_rng_in_training():
    torch.manual_seed(0)
    model = ResNet12(in_channels=1, image_size=32, channels=SMALL, drop_rate=0.3, dropblock_size=2)
    x = torch.randn(4, 1, 32, 32)
    torch.manual_seed(1)
    first, second = model(x), model(x)
    assert (first - second).abs().max() > 1e-3
    torch.manual_seed(1)
    torch.testing.assert_close(model(x), first, rtol=0, atol=0)
    without = ResNet12(in_channels=1, image_size=32, channels=SMALL)
    without.load_state_dict(model.state_dict())
    torch.testing.assert_close(without(x), without(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "size, block_size, rate", [(10, 5, 0.1), (16, 3, 0.2), (8, 1, 0.3), (2, 5, 0.1)]
)
def test_drop_block_zeroes_about_the_rate_and_keeps_the_mean(size, block_size, rate):
    torch.manual_seed(0)
    y = drop_block(torch.ones(128, 16, size, size), rate, block_size)
    # Overlapping blocks cover a little less than the rate (0.094 for 10x10 maps and 5x5 blocks).
    assert abs((y == 0).float().mean().item() - rate) < 0.02
    assert abs(y.mean().item() - 1) < 1e-5


def test_resnet12_gradients_are_finite_for_a_prototype_loss():
    torch.manual_seed(0)
    n_way, k_shot, n_query = 3, 2, 2
    model = ResNet12(image_size=16, channels=SMALL, drop_rate=0.1, dropblock_size=2)
    support = model(torch.randn(1, n_way * k_shot, 3, 16, 16))[0]  # [N*K, D]
    query = model(torch.randn(1, n_way * n_query, 3, 16, 16))[0]  # [N*Q, D]
    prototypes = support.unflatten(0, (n_way, k_shot)).mean(1)  # [N, D]
    logits = -torch.cdist(query, prototypes).square()
    F.cross_entropy(logits, torch.arange(n_way).repeat_interleave(n_query)).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0


def test_resnet12_under_vmap_and_functional_call_matches_the_task_loop():
    torch.manual_seed(0)
    learner = Classifier(
        ResNet12(in_channels=1, image_size=16, channels=[4, 4, 8, 8]), n_way=2
    ).double()
    params = dict(learner.named_parameters())
    x = torch.randn(2, 4, 1, 16, 16, dtype=torch.float64)  # [T, N*K, C, H, W]
    y = torch.tensor([0, 0, 1, 1]).expand(2, 4)

    def adapted_logits(xt, yt):
        fast = inner_loop(learner, params, xt, yt, adaptation_steps=1, inner_lr=0.1)
        return functional_call(learner, fast, (xt,))  # [N*K, n_way]

    batched = torch.func.vmap(adapted_logits)(x, y)
    looped = torch.stack([adapted_logits(x[t], y[t]) for t in range(2)])
    torch.testing.assert_close(batched, looped, rtol=1e-9, atol=1e-9)


def test_drop_block_runs_under_vmap_with_different_randomness_per_task():
    torch.manual_seed(0)
    model = ResNet12(
        in_channels=1, image_size=16, channels=[4, 4, 8, 8], drop_rate=0.3, dropblock_size=1
    )
    params = dict(model.named_parameters())
    x = torch.randn(1, 4, 1, 16, 16).expand(2, -1, -1, -1, -1)  # the same task twice
    out = torch.func.vmap(lambda xt: functional_call(model, params, (xt,)), randomness="different")(
        x
    )
    assert torch.isfinite(out).all() and (out[0] - out[1]).abs().max() > 1e-6


@pytest.mark.parametrize(
    "kwargs, fix",
    [
        ({"channels": [8, 8, 16]}, "model.channels=[8, 8, 16] must be 4 positive integers"),
        ({"channels": [8, 0, 16, 16]}, "model.channels=[8, 0, 16, 16] must be 4 positive integers"),
        ({"drop_rate": 1.0}, "model.drop_rate=1.0 must be in [0, 1)"),
        ({"drop_rate": -0.1}, "model.drop_rate=-0.1 must be in [0, 1)"),
        ({"dropblock_size": 0}, "model.dropblock_size=0 must be an integer of at least 1"),
        (
            {"image_size": 8},
            (
                "model.image_size=8 is too small for ResNet-12's 4 max-pools; "
                "use images of at least 16 pixels"
            ),
        ),
        ({"batch_norm": "batch"}, "model.batch_norm='batch' is not one of task, running"),
    ],
)
def test_resnet12_rejects_invalid_arguments_in_one_line(kwargs, fix):
    message = one_line_error(lambda: ResNet12(**{"channels": SMALL, **kwargs}))
    assert message.startswith(fix)
