"""Any timm image model as a backbone (Wightman, 2019, pytorch-image-models): pretrained features.

Few-shot learners do better from a large pretrained network than from one trained on the few-shot
training classes alone. P>M>F (Hu et al., 2022, "Pushing the Limits of Simple Pipelines for
Few-Shot Learning") starts from the self-supervised DINO ViT-S/16 (Caron et al., 2021, "Emerging
Properties in Self-Supervised Vision Transformers") and meta-trains it as a Prototypical Network:

    metarun model=timm model.name=vit_small_patch16_224.dino \
        model.weights=dino_deitsmall16_pretrain.pth

`model.name` is any name `timm.list_models()` lists, with an optional pretrained tag
(`vit_small_patch16_224.dino`): the tag picks the normalization and input size that the weights were
trained with. The weights come from a local file (`model.weights`: `.safetensors`, or a torch state
dict, plain or under "state_dict", "model" or "teacher", with a "module." or "backbone." prefix
stripped) or from timm's own download (`model.pretrained=true`, which needs the network). The
classifier is left out (`num_classes=0`): the output is timm's pooled features, `num_features` of
them (384 for ViT-S/16).

ImageNet-1k pretraining, with or without labels, has seen every class of mini-ImageNet (its 100
classes, test classes included, are ImageNet-1k classes; so are tiered-ImageNet's), so such a
backbone's mini-ImageNet accuracy is not few-shot learning of unseen classes.

Batch norm: timm's own norm layers, as timm builds them (`model.batch_norm=running` is the only
mode): a BatchNorm uses batch statistics in training, one task at a time, and updates its running
statistics at every training pass (momentum 0.1 a pass, not once a meta-batch as
metarun.models.layers' TaskBatchNorm); evaluation (`eval()`) uses the running ones. Layer norm
(ViTs) is per image either way.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.errors import MetarunError

# Dicts that checkpoints wrap their state dict in: training scripts ("state_dict", "model") and
# DINO's full checkpoint ("teacher", the network DINO evaluates).
WRAPPERS = ("state_dict", "model", "teacher")
# Prefixes of a whole state dict: DataParallel/DistributedDataParallel, and a backbone inside a
# larger network (DINO's teacher: backbone + projection head).
PREFIXES = ("module.", "backbone.")
# Classifier names timm models use, besides the one in the model's pretrained config.
CLASSIFIERS = ("head", "fc", "classifier")
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def import_timm() -> Any:
    try:
        import timm
        import timm.data
    except ImportError as e:
        raise MetarunError(
            f"model=timm needs timm, which cannot be imported ({e}); pip install 'metarun[timm]'"
        ) from None
    return timm


class TimmBackbone(nn.Module):
    """timm's `name` without its classifier, for `in_channels` x `image_size` x `image_size` images.

    Inputs: `[B, *in_shape] -> [B, D]` (one task) or `[T, B, *in_shape] -> [T, B, D]`. The images
    arrive already normalized with `input_normalization`, the model's own (the data pipeline
    applies it, in place of the dataset's normalization); this module then repeats a 1-channel
    image to the model's channels and resizes it (bilinear, antialiased when shrinking) to the
    model's `input_size`. Tasks run in one call, except in training when the model has a batch
    norm: then one call a task, so that each task is normalized with its own batch statistics.

    Attributes:
      in_shape             (in_channels, image_size, image_size): the dataset's images
      out_shape            (out_features,)
      out_features         the model's `num_features`: the embedding size
      batch_norm           "running": timm's norm layers (see the module docstring)
      input_size           (C, H, W) the model takes, from timm's data config
      input_normalization  (mean, std), per channel of `input_size`, from timm's data config
      model                the timm model; its parameter names are the checkpoint's and `freeze`'s
    """

    def __init__(
        self,
        name: str,
        in_channels: int,
        image_size: int,
        weights: Optional[str] = None,
        pretrained: bool = False,
        freeze: str = "none",
        batch_norm: str = "running",
    ):
        super().__init__()
        if batch_norm != "running":
            raise MetarunError(
                f"model.batch_norm={batch_norm!r} is not available with model=timm: timm's norm "
                "layers use batch statistics in training and running ones in evaluation; set "
                "model.batch_norm=running"
            )
        if weights is not None and pretrained:
            raise MetarunError(
                f"model.weights={weights} and model.pretrained=true both give {name} weights; "
                "pass one (model.pretrained=false to load the file)"
            )
        path = Path(weights).expanduser() if weights is not None else None
        if path is not None and not path.is_file():
            raise MetarunError(
                f"model.weights={weights} is not a file ({path.absolute()}); pass the path of a "
                ".safetensors file or a torch state dict"
            )
        timm = import_timm()
        if ":" not in name and not timm.is_model(name):  # hf-hub:..., local-dir:... as they are
            close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else "timm.list_models() lists them"
            raise MetarunError(f"model.name={name!r} is not a timm model; {hint}")
        model = create(timm, name, pretrained)
        data = timm.data.resolve_model_data_config(model)
        self.input_size = tuple(data["input_size"])
        self.input_normalization = (list(data["mean"]), list(data["std"]))
        # Grey images are normalized here, after they are repeated to the model's channels: the
        # pipeline passes them as they are (mean 0, std 1 normalizes nothing).
        mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in self.input_normalization)
        self.register_buffer("grey_mean", mean, persistent=False)
        self.register_buffer("grey_std", std, persistent=False)
        if in_channels == 1 and self.input_size[0] != 1:
            self.input_normalization = ([0.0], [1.0])
        if in_channels not in (1, self.input_size[0]):
            raise MetarunError(
                f"model.in_channels={in_channels}, but {name} takes {self.input_size[0]}-channel "
                f"images (1-channel ones are repeated); use a dataset of 1 or "
                f"{self.input_size[0]} channels"
            )
        if path is not None:
            model.load_state_dict(fitted_state_dict(read_state_dict(path), model, name, weights))
        for param_name in frozen(freeze, model, name):
            model.get_parameter(param_name).requires_grad_(False)
        self.model = model
        self.name = name
        self.in_shape = (in_channels, image_size, image_size)
        self.out_features = int(model.num_features)
        self.out_shape = (self.out_features,)
        self.batch_norm = batch_norm
        self.has_batch_norm = any(isinstance(m, BATCH_NORMS) for m in model.modules())

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (4, 5) or tuple(x.shape[-3:]) != self.in_shape:
            raise MetarunError(
                f"TimmBackbone was built for [B, {', '.join(map(str, self.in_shape))}] or [T, B, ...] "
                f"inputs but got shape {tuple(x.shape)}; set model.in_channels and model.image_size "
                "to the dataset's (the defaults follow it)"
            )
        if x.dim() == 4:
            return self.embed(x)
        if self.training and self.has_batch_norm:
            return torch.stack([self.embed(task) for task in x])  # [T, B, D]
        return self.embed(x.flatten(0, 1)).unflatten(0, x.shape[:2])  # [T, B, D]

    def embed(self, x: Tensor) -> Tensor:
        """`[N, *in_shape] -> [N, D]`: resized and channel-repeated to `input_size`, then timm's model."""
        size = self.input_size[1:]
        if tuple(x.shape[-2:]) != size:
            shrinks = x.shape[-2] > size[0] or x.shape[-1] > size[1]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinks)
        if x.shape[1] != self.input_size[0]:
            x = x.expand(-1, self.input_size[0], -1, -1)  # [N, C, H, W]: grey to every channel
            x = (x - self.grey_mean) / self.grey_std
        return self.model(x)


def create(timm: Any, name: str, pretrained: bool) -> nn.Module:
    """timm.create_model without the classifier; a failed download as a one-line MetarunError."""
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=0)
    try:
        return timm.create_model(name, pretrained=True, num_classes=0)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        source, cache = download_source(timm, name)
        raise MetarunError(
            f"model.pretrained=true could not get {name}'s weights ({reason}); download them where "
            f"the machine is online ({source}) and pass model.weights=FILE (.safetensors or a "
            f"torch state dict), or copy timm's cache {cache} from there"
        ) from None


def download_source(timm: Any, name: str) -> tuple[str, str]:
    """Where timm downloads `name`'s weights from, and the cache it keeps them in."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:
        cfg = None
    if cfg is not None and cfg.hf_hub_id:
        try:
            from huggingface_hub.constants import HF_HUB_CACHE
        except ImportError:
            HF_HUB_CACHE = "~/.cache/huggingface/hub"
        return f"huggingface.co/{cfg.hf_hub_id}", str(HF_HUB_CACHE)
    url = getattr(cfg, "url", None) or "timm's pretrained config"
    return url, torch.hub.get_dir()  # torch.hub keeps the files in a folder under it


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a `.safetensors` file or a torch state dict, unwrapped from WRAPPERS."""
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise MetarunError(
                f"model.weights={path} needs safetensors ({e}); pip install 'metarun[timm]'"
            ) from None
        try:
            return load_file(str(path))
        except Exception as e:
            raise MetarunError(
                f"model.weights={path} is not a readable .safetensors file ({e})"
            ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise MetarunError(
            f"model.weights={path} is not a torch state dict ({reason}); save it with "
            "torch.save(model.state_dict(), FILE) or as .safetensors"
        ) from None
    while isinstance(state, dict):
        wrapper = next((k for k in WRAPPERS if isinstance(state.get(k), dict)), None)
        if wrapper is None:
            break
        state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        keys = (
            ", ".join(map(str, list(state)[:5]))
            if isinstance(state, dict)
            else type(state).__name__
        )
        raise MetarunError(
            f"model.weights={path} holds {keys}, not a state dict of tensors; pass a file of the "
            f"model's state dict (plain or under {', '.join(map(repr, WRAPPERS))})"
        )
    return state


def fitted_state_dict(
    state: dict[str, Tensor], model: nn.Module, name: str, weights: str
) -> dict[str, Tensor]:
    """`state` as `model.load_state_dict` takes it: prefixes stripped, timm's own conversion of
    other releases' layouts applied, the classifier (which num_classes=0 leaves out) dropped.
    MetarunError naming the first keys that still do not fit."""
    heads = classifier_names(model)
    for prefix in PREFIXES:
        body = [k for k in state if not is_classifier(k, heads)]
        if body and all(k.startswith(prefix) for k in body):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    state = timm_conversion(state, model)
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if k in expected or not is_classifier(k, heads)}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        problems = [
            f"{what} {', '.join(keys[:3])}{f' (+{len(keys) - 3} more)' if len(keys) > 3 else ''}"
            for what, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                (
                    "wrong shape",
                    [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in wrong],
                ),
            )
            if keys
        ]
        raise MetarunError(
            f"model.weights={weights} does not fit timm's {name}: {'; '.join(problems)}; pass "
            f"weights saved from {name}, or set model.name to the model they came from"
        )
    return state


def classifier_names(model: nn.Module) -> set[str]:
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    return set(CLASSIFIERS) | ({classifier} if isinstance(classifier, str) else set(classifier))


def is_classifier(key: str, heads: set[str]) -> bool:
    return any(key == head or key.startswith(head + ".") for head in heads)


def timm_conversion(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """The model family's `checkpoint_filter_fn`, as timm applies to its own downloads (it maps
    other releases' layouts onto timm's, resamples position embeddings); `state` unchanged where
    the family has none or it does not apply."""
    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if convert is None:
        return state
    try:
        return convert(dict(state), model)
    except Exception:
        return state


def frozen(freeze: str, model: nn.Module, name: str) -> list[str]:
    """Names of the parameters `freeze` ("none", "all", or comma-separated name prefixes) names."""
    names = [n for n, _ in model.named_parameters()]
    if freeze == "none":
        return []
    if freeze == "all":
        return names
    prefixes = [p.strip() for p in freeze.split(",") if p.strip()]
    chosen: list[str] = []
    for prefix in prefixes:
        matched = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not matched:
            modules = [m for m, _ in model.named_modules() if m] + names
            close = difflib.get_close_matches(prefix, modules, n=1)
            tops = ", ".join(dict.fromkeys(n.split(".")[0] for n in names))
            hint = f"did you mean {close[0]}?" if close else f"its parameters start with {tops}"
            raise MetarunError(
                f"model.freeze={freeze!r}: {prefix!r} names no parameter of {name}; pass none, "
                f"all, or comma-separated prefixes of its parameter names ({hint})"
            )
        chosen += [n for n in matched if n not in chosen]
    return chosen
