"""model=timm: timm's tiny test models with random weights, saved to files and loaded back; inputs of
other sizes and channels; task batches; freezing; the one-line refusals; the config node."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metarun.models.timm_model import TimmBackbone
from tests.conftest import one_line_error

timm = pytest.importorskip("timm")
pytest.importorskip("safetensors")

VIT = "test_vit"  # timm's test ViT: 0.3M parameters, 3x160x160 input, 64 features, layer norm
RESNET = "test_resnet"  # timm's test ResNet: 0.4M parameters, 96 features, batch norm
CONF = Path(__file__).parents[2] / "conf" / "model" / "timm.yaml"


def tiny(seed: int, name: str = VIT, **options) -> TimmBackbone:
    torch.manual_seed(seed)
    return TimmBackbone(name, in_channels=3, image_size=32, **options).eval()


def saved(model: TimmBackbone, path: Path) -> Path:
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_saved_to_a_file_load_back_into_the_same_outputs(tmp_path, suffix):
    source, x = tiny(0), torch.rand(4, 3, 32, 32)
    path = saved(source, tmp_path / f"weights{suffix}")
    assert not torch.equal(tiny(1)(x), source(x))
    loaded = tiny(1, weights=str(path))
    assert torch.equal(loaded(x), source(x))
    state = loaded.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in source.model.state_dict().items())


@pytest.mark.parametrize(
    "wrapper, prefix, head",
    [("state_dict", "module.", "head.weight"), ("teacher", "backbone.", "head.mlp.0.weight")],
)
def test_a_wrapped_checkpoint_loads_without_its_prefix_and_classifier(
    tmp_path, wrapper, prefix, head
):
    source, x = tiny(0), torch.rand(2, 3, 32, 32)
    state = {f"{prefix}{k}": v for k, v in source.model.state_dict().items()}
    state[head] = torch.zeros(10, source.out_features)  # a classifier or projection head: dropped
    torch.save({wrapper: state, "epoch": 3}, tmp_path / "checkpoint.pth")
    assert torch.equal(tiny(1, weights=str(tmp_path / "checkpoint.pth"))(x), source(x))


def test_a_task_batch_embeds_as_its_tasks_one_by_one():
    vit = tiny(0)
    x = torch.rand(2, 3, 3, 32, 32)  # [T, B, C, H, W]
    out = vit(x)
    assert out.shape == (2, 3, 64)
    torch.testing.assert_close(out, torch.stack([vit(task) for task in x]))
    # In training a batch norm normalizes each task with its own statistics.
    resnet = tiny(0, RESNET).train()
    assert torch.equal(resnet(x), torch.stack([resnet(task) for task in x]))


def test_grey_28x28_images_are_repeated_and_resized_to_the_models_input():
    model = TimmBackbone(VIT, in_channels=1, image_size=28).eval()
    assert model.in_shape == (1, 28, 28) and model.input_size == (3, 160, 160)
    # Grey images arrive as they are and are normalized once repeated to the model's channels.
    assert model.input_normalization == ([0.0], [1.0])
    assert model.out_shape == (model.out_features,) and model.batch_norm == "running"
    x = torch.rand(5, 1, 28, 28)
    out = model(x)
    assert out.shape == (5, model.out_features)
    resized = F.interpolate(x, (160, 160), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, model.model((resized.expand(-1, 3, -1, -1) - 0.5) / 0.5))
    colour = TimmBackbone(VIT, in_channels=3, image_size=28)
    assert colour.input_normalization == ([0.5] * 3, [0.5] * 3)


def test_freeze_all_leaves_nothing_to_train_and_prefixes_freeze_exactly_theirs():
    assert not any(p.requires_grad for p in tiny(0, freeze="all").parameters())
    assert all(p.requires_grad for p in tiny(0).parameters())
    part = tiny(0, freeze="patch_embed, blocks.0")
    frozen = {n for n, p in part.model.named_parameters() if not p.requires_grad}
    named = {
        n for n, _ in part.model.named_parameters() if n.startswith(("patch_embed.", "blocks.0."))
    }
    assert frozen == named and named
    assert "'blokcs.0' names no parameter" in one_line_error(lambda: tiny(0, freeze="blokcs.0"))


def test_weights_of_another_model_are_refused_naming_the_keys(tmp_path):
    other = saved(tiny(0, RESNET), tmp_path / "resnet.safetensors")
    message = one_line_error(lambda: tiny(0, weights=str(other)))
    assert "does not fit timm's test_vit: missing cls_token" in message
    assert "; unexpected bn1.num_batches_tracked" in message
    state = tiny(0).model.state_dict()
    state["norm.weight"] = torch.ones(65)
    torch.save(state, tmp_path / "wider.pt")
    assert "wrong shape norm.weight (65,) vs (64,)" in one_line_error(
        lambda: tiny(0, weights=str(tmp_path / "wider.pt"))
    )


def test_bad_options_are_one_line_errors_naming_the_fix(tmp_path, monkeypatch):
    assert "is not a file" in one_line_error(lambda: tiny(0, weights=str(tmp_path / "no.pt")))
    assert "did you mean test_vit" in one_line_error(lambda: TimmBackbone("test_vitt", 3, 32))
    assert "set model.batch_norm=running" in one_line_error(lambda: tiny(0, batch_norm="task"))
    torch.save({"epoch": 3}, tmp_path / "epoch.pt")
    assert "not a state dict of tensors" in one_line_error(
        lambda: tiny(0, weights=str(tmp_path / "epoch.pt"))
    )

    create = timm.create_model

    def offline(name, pretrained=False, **kwargs):
        if pretrained:
            raise ConnectionError("Name or service not known\nretrying")
        return create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    assert "download them where the machine is online" in one_line_error(
        lambda: tiny(0, pretrained=True)
    )
    monkeypatch.setitem(sys.modules, "timm", None)
    assert "pip install 'metarun[timm]'" in one_line_error(lambda: tiny(0))


def test_the_config_node_builds_the_backbone():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from metarun.config import check_target_arguments

    node = OmegaConf.load(CONF)
    assert "init" in node and node.name == "vit_small_patch16_224"
    node.name, node.in_channels, node.image_size = VIT, 3, 32
    check_target_arguments("model", node)
    del node["init"]  # metarun's own key
    model = instantiate(node)
    assert isinstance(model, TimmBackbone) and model.in_shape == (3, 32, 32)
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 64)


def test_a_run_normalizes_with_the_models_statistics_and_learns_through_it(make_config, tmp_path):
    from metarun.trainer import Trainer

    cfg = make_config(
        "model=timm",
        f"model.name={VIT}",
        "algorithm=protonet",
        "episode.n_query=3",
        "eval.n_query=3",
        "train.steps=4",
        "train.val_every=4",
        "eval.episodes=4",
        dataset="folder",
    )
    trainer = Trainer(cfg, tmp_path)
    assert trainer.samplers["val"].mean_std == ([0.5] * 3, [0.5] * 3)
    results = trainer.run()
    assert 0 <= results["test_accuracy"] <= 1
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert saved["normalization"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    from metarun.saved_run import open_run

    for normalization in ("train", "target"):  # the model's own, whatever the dataset's
        again = open_run(tmp_path, [f"eval.normalization={normalization}"])
        assert again.mean_std == ([0.5] * 3, [0.5] * 3)
