import pytest
import torch
from torch import nn

from metarun.errors import MetarunError
from metarun.models.conv4 import Conv4
from metarun.models.layers import plain_task_batch_norm, task_batch_norm
from metarun.vmap import is_vmapped


def test_conv4_embeds_4d_and_5d_batches():
    torch.manual_seed(0)
    model = Conv4(in_channels=1, hidden=8)
    assert model.out_features == 8  # 28 -> 14 -> 7 -> 3 -> 1
    assert model(torch.randn(6, 1, 28, 28)).shape == (6, 8)
    assert model(torch.randn(2, 3, 1, 28, 28)).shape == (2, 3, 8)


@pytest.mark.parametrize("in_channels, image_size, side", [(1, 28, 1), (3, 32, 2), (3, 84, 5)])
def test_conv4_out_features_follow_image_size(in_channels, image_size, side):
    # 28 -> 14 -> 7 -> 3 -> 1; 32 -> 16 -> 8 -> 4 -> 2; 84 -> 42 -> 21 -> 10 -> 5
    model = Conv4(in_channels=in_channels, hidden=32, image_size=image_size)
    assert model.out_shape == (32, side, side) and model.out_features == 32 * side**2
    assert model(torch.randn(2, in_channels, image_size, image_size)).shape == (2, 32 * side**2)


def test_conv4_names_the_fix_for_a_wrong_image_size():
    with pytest.raises(MetarunError, match="model.image_size=84"):
        Conv4(hidden=4)(torch.randn(2, 1, 84, 84))


@pytest.mark.parametrize("batch_norm", [task_batch_norm, plain_task_batch_norm])
def test_task_batch_norm_gives_zero_mean_unit_variance_per_task_and_channel(batch_norm):
    torch.manual_seed(0)
    shift = torch.arange(10.0, dtype=torch.float64).view(10, 1, 1, 1)
    x = torch.randn(2 * 5, 3, 4, 4, dtype=torch.float64) * 3 + shift  # [T*B, C, H, W], T=2
    y = batch_norm(
        x, 2, torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), eps=1e-12
    )
    y = y.unflatten(0, (2, 5))  # [T, B, C, H, W]
    torch.testing.assert_close(
        y.mean(dim=(1, 3, 4)), torch.zeros(2, 3, dtype=torch.float64), rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        y.var(dim=(1, 3, 4), correction=0), torch.ones(2, 3, dtype=torch.float64)
    )
    weight = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    bias = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    z = batch_norm(x, 2, weight, bias, eps=1e-12).unflatten(0, (2, 5))
    torch.testing.assert_close(z, y * weight.view(1, 1, 3, 1, 1) + bias.view(1, 1, 3, 1, 1))


def test_batch_norm_takes_the_plain_path_only_under_vmap():
    x = torch.randn(3, 2, 4)
    assert not is_vmapped(x)
    seen = torch.func.vmap(lambda t: torch.tensor(is_vmapped(t)))(x)
    under_grad = torch.func.vmap(torch.func.grad(lambda t: t.sum() * is_vmapped(t)))(x)
    assert seen.all() and (under_grad == 1).all()


def test_conv4_has_no_running_statistics():
    model = Conv4(hidden=4)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert len(list(model.buffers())) == 0
    model.eval()
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(model(x), model.train()(x))


def test_conv4_pool_layers_sets_the_feature_map_shape_for_28x28_images():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 1, 28, 28)  # [T, B, C, H, W]
    paper = Conv4(hidden=8, pool_layers=2)  # 28 -> 14 -> 7 -> 7 -> 7
    assert paper.out_shape == (8, 7, 7) and paper.out_features == 8 * 7 * 7
    assert paper(x).shape == (3, 4, 392)
    default = Conv4(hidden=8, pool_layers=None)  # 28 -> 14 -> 7 -> 3 -> 1
    assert default.out_shape == (8, 1, 1) and default.out_features == 8
    assert default(x).shape == (3, 4, 8)
    assert Conv4(hidden=8, pool_layers=0).out_shape == (8, 28, 28)


def test_conv4_pool_layers_none_is_the_unchanged_default():
    torch.manual_seed(0)
    default = Conv4(hidden=8)
    torch.manual_seed(0)
    all_pool = Conv4(hidden=8, pool_layers=4)
    assert default.pool_layers == all_pool.pool_layers == 4
    assert all(block.pool for block in default.blocks)
    x = torch.randn(5, 1, 28, 28)
    torch.testing.assert_close(default(x), all_pool(x), rtol=0, atol=0)
    # The same parameter names as before pool_layers existed: old checkpoints still load.
    names = [
        f"blocks.{i}.{p}" for i in range(4) for p in ("conv.weight", "norm.weight", "norm.bias")
    ]
    assert list(default.state_dict()) == names


def test_conv4_rejects_pool_layers_outside_zero_to_layers():
    with pytest.raises(
        MetarunError, match=r"model.pool_layers=5 must be an integer from 0 to model.layers=4"
    ):
        Conv4(hidden=4, pool_layers=5)


def test_conv4_stride_downsampling_is_mamls_omniglot_network():
    # cbfinn/maml on Omniglot: stride-2 3x3 convs with padding, no max-pooling, the last map averaged.
    torch.manual_seed(0)
    model = Conv4(hidden=64, downsample="stride")
    assert [block.conv.stride for block in model.blocks] == [(2, 2)] * 4
    assert not any(block.pool for block in model.blocks)
    maps = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: maps.append(tuple(out.shape[1:])))
    x = torch.randn(5, 1, 28, 28)
    embedding = model(x)
    assert maps == [(64, 14, 14), (64, 7, 7), (64, 4, 4), (64, 2, 2)]  # 28 -> 14 -> 7 -> 4 -> 2
    # The paper's last hidden layer of 64: the 64x2x2 map averaged over its positions.
    assert model.out_shape == (64, 1, 1) and model.out_features == 64
    assert embedding.shape == (5, 64)
    last_map = x
    for block in model.blocks:
        last_map = block(last_map)
    torch.testing.assert_close(embedding, last_map.mean(dim=(2, 3)))
    # Parameters named as the pooling network's: one checkpoint layout for both.
    assert list(model.state_dict()) == list(Conv4(hidden=64).state_dict())


def test_conv4_rejects_an_unknown_downsample():
    with pytest.raises(
        MetarunError,
        match=r"model.downsample='avg' is not one of pool, stride; set model.downsample=pool",
    ):
        Conv4(hidden=4, downsample="avg")
