import pytest
import torch
import torch.nn.functional as F
import torchvision
from hydra.utils import instantiate

from metarun.algorithms.protonet import prototypes, squared_euclidean
from metarun.config import target_node
from metarun.models.resnet18 import ResNet18
from tests.conftest import compose_config, one_line_error


def layer_sizes(model: ResNet18, x: torch.Tensor) -> list[int]:
    """The side of layer1..layer4's feature maps for input `x`."""
    sizes = []
    hooks = [
        getattr(model, f"layer{i}")[-1].register_forward_hook(
            lambda m, args, out: sizes.append(out.shape[-1])
        )
        for i in range(1, 5)
    ]
    model(x)
    for hook in hooks:
        hook.remove()
    return sizes


@pytest.mark.parametrize(
    "in_channels, image_size, sizes",
    [
        (1, 28, [28, 14, 7, 4]),  # 3x3 stride-1 stem
        (3, 32, [32, 16, 8, 4]),
        (3, 84, [42, 21, 11, 6]),  # 7x7 stride-2 stem, no max-pool
    ],
)
def test_resnet18_embeds_small_images_in_512_features_at_full_width(in_channels, image_size, sizes):
    torch.manual_seed(0)
    model = ResNet18(in_channels=in_channels, image_size=image_size)
    assert model.out_shape == (512, 1, 1) and model.out_features == 512
    x = torch.randn(1, in_channels, image_size, image_size)
    assert layer_sizes(model, x) == sizes
    assert model(x).shape == (1, 512)


def test_resnet18_keeps_torchvisions_max_pool_from_100x100():
    model = ResNet18(image_size=224, width=8)
    assert layer_sizes(model, torch.randn(2, 3, 224, 224)) == [56, 28, 14, 7]
    assert model.out_shape == (64, 1, 1)


def test_resnet18_has_torchvisions_resnet18_trunk_parameters():
    ours = dict(ResNet18(in_channels=3, image_size=84).named_parameters())
    theirs = {
        name: p
        for name, p in torchvision.models.resnet18(num_classes=1).named_parameters()
        if not name.startswith("fc.")
    }  # BatchNorm2d's weight/bias counted as TaskBatchNorm's
    assert (
        sum(p.numel() for p in ours.values())
        == sum(p.numel() for p in theirs.values())
        == 11_176_512
    )
    assert {n: p.shape for n, p in ours.items()} == {n: p.shape for n, p in theirs.items()}


@pytest.mark.parametrize("batch_norm", ["task", "running"])
def test_resnet18_computes_torchvisions_resnet18_with_its_weights(batch_norm):
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18(num_classes=1)
    with torch.no_grad():  # statistics and scales other than 0 and 1, so that using them shows
        for m in theirs.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 2)
    ours = ResNet18(image_size=112, batch_norm=batch_norm)
    ours.load_state_dict(
        {n: v for n, v in theirs.state_dict().items() if n in ours.state_dict()}, strict=True
    )
    trunk = torch.nn.Sequential(*list(theirs.children())[:-1])  # without fc
    if batch_norm == "running":  # torchvision in train mode normalizes as task mode does one task
        ours.eval()
        trunk.eval()
    x = torch.randn(2, 3, 112, 112)
    torch.testing.assert_close(ours(x), trunk(x).flatten(1), rtol=1e-4, atol=1e-4)


def test_resnet18_gives_finite_gradients_for_a_protonet_loss():
    torch.manual_seed(0)
    model = ResNet18(image_size=32, width=8)
    support_y = torch.arange(5).unsqueeze(0)  # [T, N*K]: 5-way 1-shot
    query_y = torch.arange(5).repeat_interleave(2)  # [N*Q]
    emb = model(torch.randn(1, 5 + 10, 3, 32, 32))  # [T, N*K + N*Q, D]
    logits = -squared_euclidean(emb[:, 5:], prototypes(emb[:, :5], support_y, 5))  # [T, N*Q, N]
    F.cross_entropy(logits[0], query_y).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        ({"in_channels": 0}, "model.in_channels=0"),
        ({"image_size": "84"}, "model.image_size='84'"),
        ({"width": True}, "model.width=True"),
        ({"width": -8}, "model.width=-8"),
        ({"batch_norm": "batch"}, "model.batch_norm='batch'"),
    ],
)
def test_resnet18_rejects_bad_arguments_in_one_line(kwargs, key):
    assert one_line_error(lambda: ResNet18(**kwargs)).startswith(key)


def test_resnet18_config_follows_the_dataset():
    cfg = compose_config("model=resnet18", "dataset=miniimagenet")
    model = instantiate(
        target_node(cfg, "model"), width=8
    )  # the node as metarun builds it (no model.init)
    assert isinstance(model, ResNet18) and model.in_shape == (3, 84, 84)
    assert (model.width, model.batch_norm) == (8, "task") and cfg.model.width == 64
