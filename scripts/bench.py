"""Meta-training throughput and peak memory of metarun's MAML and ProtoNet against plain per-task loops.

What: one full meta-training step (forward, backward, Adam step) on one fixed synthetic
Omniglot-shaped meta-batch (5-way 1-shot, 15 queries per class, 1x28x28, seeded), with the same
Conv4 (64 channels) and the same initial parameters, for
  - metarun MAML, second order, task_batching loop / vmap / auto, 1 and 5 inner steps;
  - metarun first-order MAML, loop / vmap, 1 and 5 inner steps;
  - a plain per-task MAML loop (the original MAML code's formulation: `autograd.grad` with
    `create_graph` for the inner step, `functional_call` for the query, one `backward()`);
  - metarun ProtoNet and a plain per-task ProtoNet loop.
Then the same on a mini-ImageNet-shaped meta-batch (3x84x84, `--meta-batch-84` tasks: 2 on the CPU,
where one ResNet-12 episode takes seconds, 32 on CUDA), in a second table:
  - metarun ProtoNet with ResNet-12 (64-160-320-640) and the plain ProtoNet loop; a task is an
    episode, so its tasks/s are episodes/s;
  - metarun second-order MAML with Conv4-32 (MAML's mini-ImageNet network), task_batching loop /
    auto, 1 and 5 inner steps, and the plain MAML loop.
How: each configuration runs in a fresh subprocess (`--one NAME`, one JSON line back), one after
another, so neither timings nor peak memory contaminate each other. Throughput is tasks/s of the
median of `--iters` timed steps after `--warmup` steps (`time.perf_counter`, CUDA synchronized). Peak memory is,
on CPU, the growth of the process's peak RSS from after building model and data to after the
steps, plus the absolute peak RSS (VmHWM, not `ru_maxrss`: Linux carries the parent's RSS across
fork and exec into the child's `ru_maxrss`, which would hide the growth); on CUDA `torch.cuda.max_memory_allocated()` (growth over the
model and data, and absolute). Before timing each table, the script checks that metarun's
second-order 1-step meta-gradient (loop and vmap) equals the plain loop's on that table's MAML
network (Conv4 on 1x28x28, Conv4-32 on 3x84x84), so the tables compare equal computations.

Then, in one more process, episode sampling from a mini-ImageNet-shaped uint8 tensor (64 classes x
600 images x 3x84x84, 0.8 GB, as `dataset=miniimagenet` holds its training part): episodes per
second drawn on the device (gather, scale, normalize; and with `augment=standard` on the support
set), and sampling's share of a Conv4 ProtoNet training step on those episodes. Sampling and the
step alternate in `--rounds` rounds; the table gives medians and the spread (min-max) over rounds.

    python scripts/bench.py [--device cpu|cuda|auto] [--iters N] [--warmup N] [--meta-batch 32]
                            [--image-shape 1 28 28] [--meta-batch-84 N] [--out results.json] [--quick]
                            [--skip-84 | --only-84] [--skip-sampling]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metarun.algorithms.maml import MAML
from metarun.models.layers import Classifier
from metarun.algorithms.task_batching import resolve_task_batching
from metarun.algorithms.protonet import ProtoNet
from metarun.data.augment import Augment
from metarun.data.contract import ClassImages
from metarun.data.miniimagenet import MEAN, STD
from metarun.data.sampler import EpisodeSampler
from metarun.data.tasks import TaskBatch
from metarun.device import resolve_device
from metarun.models.conv4 import Conv4
from metarun.models.resnet12 import ResNet12

N_WAY, K_SHOT, N_QUERY = 5, 1, 15
IMAGE_SHAPE = [1, 28, 28]  # --image-shape; the default is Omniglot's
MINI_IMAGENET_SHAPE = (3, 84, 84)
SAMPLING_SHAPE = (64, 600, 3, 84, 84)  # mini-ImageNet's training part: classes, images each, C, H, W
INNER_LR, META_LR = 0.4, 1e-3
SEED = 0
GRAD_TOLERANCE = 1e-4  # relative, float32: ||g - g_plain|| / ||g_plain||
MIB = 2**20


def conv4(shape: Sequence[int], hidden: int = 64) -> Conv4:
    return Conv4(in_channels=shape[0], hidden=hidden, image_size=shape[-1])


@dataclass(frozen=True)
class Network:
    """A benchmarked network: `make(image_shape)` builds it for the images it is benchmarked on."""

    label: str
    make: Callable[[Sequence[int]], nn.Module]
    image_shape: Sequence[int]

    def build(self) -> nn.Module:
        return self.make(self.image_shape)

    @property
    def description(self) -> str:
        return f"{self.label} on {'x'.join(map(str, self.image_shape))}"


# Config.backbone -> network and images. "conv4" is the first table's, on IMAGE_SHAPE itself, so that
# --image-shape (which rewrites that list in place) reaches it.
BACKBONES = {
    "conv4": Network("Conv4", conv4, IMAGE_SHAPE),
    "conv4-32": Network("Conv4-32", lambda shape: conv4(shape, hidden=32), MINI_IMAGENET_SHAPE),
    "resnet12": Network("ResNet-12", lambda shape: ResNet12(in_channels=shape[0], image_size=shape[-1]),
                         MINI_IMAGENET_SHAPE),  # MetaOptNet's widths, 64-160-320-640
}


@dataclass(frozen=True)
class Config:
    """One benchmarked configuration. implementation: "loop", "vmap", "auto" (metarun MAML's
    task_batching), "metarun" (ProtoNet) or "plain" (the loop written in this script)."""

    method: str  # "MAML" or "ProtoNet"
    implementation: str
    first_order: bool = False
    adaptation_steps: int = 0
    backbone: str = "conv4"  # a key of BACKBONES

    @property
    def name(self) -> str:
        if self.method == "ProtoNet":
            name = f"protonet-{self.implementation}"
        else:
            name = f"{'fomaml' if self.first_order else 'maml2'}-{self.implementation}-{self.adaptation_steps}"
        return name if self.backbone == "conv4" else f"{name}-{self.backbone}"

    @property
    def image_shape(self) -> Sequence[int]:
        return BACKBONES[self.backbone].image_shape

    @property
    def baseline(self) -> Config:
        """The plain loop computing the same thing."""
        return replace(self, implementation="plain")


def all_configs(quick: bool) -> list[Config]:
    """The first table, Conv4 on IMAGE_SHAPE: grouped by method, order and inner steps, the plain
    loop last in each group."""
    steps = (1,) if quick else (1, 5)
    configs = []
    for first_order in (False, True):
        batchings = ("loop", "vmap") if first_order else ("loop", "vmap", "auto")
        for s in steps:
            configs += [Config("MAML", b, first_order, s) for b in batchings + ("plain",)]
    return configs + [Config("ProtoNet", "metarun"), Config("ProtoNet", "plain")]


def mini_imagenet_configs(quick: bool) -> list[Config]:
    """The second table, on 3x84x84: second-order MAML with Conv4-32, then ProtoNet with ResNet-12,
    the plain loop last in each group. --quick keeps only the ProtoNet pair: the MAML network is
    exercised by the gradient check already, ResNet-12 only here."""
    protonet = [Config("ProtoNet", i, backbone="resnet12") for i in ("metarun", "plain")]
    if quick:
        return protonet
    maml = [Config("MAML", b, False, s, "conv4-32") for s in (1, 5) for b in ("loop", "auto", "plain")]
    return maml + protonet


def synthetic_tasks(meta_batch: int, device: torch.device, image_shape: Sequence[int]) -> TaskBatch:
    """Random images with labels 0..N-1 in class order; seeded, so every process sees the same batch."""
    generator = torch.Generator().manual_seed(SEED)
    support_x = torch.randn(meta_batch, N_WAY * K_SHOT, *image_shape, generator=generator)  # [T, N*K, C, H, W]
    query_x = torch.randn(meta_batch, N_WAY * N_QUERY, *image_shape, generator=generator)  # [T, N*Q, C, H, W]
    support_y = torch.arange(N_WAY).repeat_interleave(K_SHOT).expand(meta_batch, -1)  # [T, N*K]
    query_y = torch.arange(N_WAY).repeat_interleave(N_QUERY).expand(meta_batch, -1)  # [T, N*Q]
    return TaskBatch(support_x, support_y.contiguous(), query_x, query_y.contiguous(), N_WAY).to(device)


def initial_model(method: str, backbone: str) -> nn.Module:
    """The seeded network whose state every implementation of `method` on `backbone` starts from."""
    torch.manual_seed(SEED)
    network = BACKBONES[backbone].build()
    return Classifier(network, N_WAY) if method == "MAML" else network


def plain_maml_loss(model: nn.Module, tasks: TaskBatch, adaptation_steps: int, first_order: bool) -> Tensor:
    """MAML as in the original code: per task, inner steps by `autograd.grad`, query loss with the
    fast weights; the mean over tasks of the query losses."""
    params = dict(model.named_parameters())
    total = 0.0
    for i in range(len(tasks)):
        fast = params
        for _ in range(adaptation_steps):
            support_logits = functional_call(model, fast, (tasks.support_x[i],))  # [N*K, N]
            support_loss = F.cross_entropy(support_logits, tasks.support_y[i])
            grads = torch.autograd.grad(support_loss, list(fast.values()), create_graph=not first_order)
            fast = {name: w - INNER_LR * g for (name, w), g in zip(fast.items(), grads)}
        query_logits = functional_call(model, fast, (tasks.query_x[i],))  # [N*Q, N]
        total = total + F.cross_entropy(query_logits, tasks.query_y[i])
    return total / len(tasks)


def plain_protonet_loss(model: nn.Module, tasks: TaskBatch) -> Tensor:
    """ProtoNet task by task: class means of the support embeddings, negative squared distances as
    logits; the mean over tasks of the query losses (metarun's loss, which averages all queries)."""
    n_support = tasks.support_x.shape[1]
    total = 0.0
    for i in range(len(tasks)):
        episode = torch.cat([tasks.support_x[i], tasks.query_x[i]])[None]  # [1, N*K + N*Q, C, H, W]
        emb = model(episode)[0]  # [N*K + N*Q, D]
        support_emb, query_emb = emb[:n_support], emb[n_support:]
        prototypes = torch.stack([support_emb[tasks.support_y[i] == n].mean(dim=0) for n in range(N_WAY)])  # [N, D]
        logits = -(query_emb[:, None] - prototypes[None]).square().sum(dim=-1)  # [N*Q, N]
        total = total + F.cross_entropy(logits, tasks.query_y[i])
    return total / len(tasks)


def build(config: Config, tasks: TaskBatch, device: torch.device) -> tuple[nn.Module, Callable[[], Tensor]]:
    """The network holding the meta-parameters (named as in `initial_model`) and the meta-loss."""
    if config.implementation == "plain":
        model = initial_model(config.method, config.backbone).to(device)
        if config.method == "MAML":
            return model, lambda: plain_maml_loss(model, tasks, config.adaptation_steps, config.first_order)
        return model, lambda: plain_protonet_loss(model, tasks)
    if config.method == "MAML":
        learner = MAML(
            BACKBONES[config.backbone].build(),
            N_WAY,
            inner_lr=INNER_LR,
            adaptation_steps=config.adaptation_steps,
            first_order=config.first_order,
            task_batching=config.implementation,
        )
    else:
        learner = ProtoNet(BACKBONES[config.backbone].build(), N_WAY)
    learner.model.load_state_dict(initial_model(config.method, config.backbone).state_dict())
    learner.to(device)
    return learner.model, lambda: learner(tasks)[0]


def meta_gradient(config: Config, tasks: TaskBatch, device: torch.device) -> dict[str, Tensor]:
    model, meta_loss = build(config, tasks, device)
    meta_loss().backward()
    return {name: p.grad for name, p in model.named_parameters()}


def check_gradients(backbone: str, meta_batch: int, device: torch.device) -> dict[str, float]:
    """Relative difference of metarun's second-order 1-step meta-gradient (loop and vmap) from the
    plain loop's, with `backbone` on a synthetic meta-batch of its images; exits if either exceeds
    the float32 tolerance."""
    tasks = synthetic_tasks(meta_batch, device, BACKBONES[backbone].image_shape)
    network = BACKBONES[backbone].description
    flat = lambda grads: torch.cat([g.flatten() for g in grads.values()])  # noqa: E731
    plain = flat(meta_gradient(Config("MAML", "plain", False, 1, backbone), tasks, device))
    diffs = {}
    for batching in ("loop", "vmap"):
        grads = flat(meta_gradient(Config("MAML", batching, False, 1, backbone), tasks, device))
        diffs[batching] = ((grads - plain).norm() / plain.norm()).item()
        print(f"meta-gradient check, MAML 2nd order 1 step, {network}, metarun {batching} vs plain "
              f"loop: relative difference {diffs[batching]:.1e} (tolerance {GRAD_TOLERANCE:.0e})")
    if max(diffs.values()) > GRAD_TOLERANCE:
        sys.exit(f"metarun's MAML meta-gradient on {network} differs from the plain loop's; the "
                 "throughput table would compare different computations. Fix the gradient before benchmarking.")
    return diffs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_rss_mib() -> float:
    """This process image's peak RSS; `ru_maxrss` would start at the parent's RSS (see top)."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return kib * 1024 / MIB


def measure(config: Config, device: torch.device, meta_batch: int, iters: int, warmup: int) -> dict:
    """Time `iters` meta-training steps after `warmup`; peak memory over all of them."""
    tasks = synthetic_tasks(meta_batch, device, config.image_shape)
    model, meta_loss = build(config, tasks, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=META_LR)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        meta_loss().backward()
        optimizer.step()

    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / MIB
    else:
        base = peak_rss_mib()
    for _ in range(warmup):
        step()
    step_seconds = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        step_seconds.append(time.perf_counter() - start)
    # The median step: on a shared 2-core machine one slow step would otherwise move the mean by 10%.
    seconds = statistics.median(step_seconds)
    peak = torch.cuda.max_memory_allocated() / MIB if device.type == "cuda" else peak_rss_mib()
    return {
        **asdict(config),
        "name": config.name,
        "image_shape": list(config.image_shape),
        "meta_batch": meta_batch,
        "step_seconds": step_seconds,
        "tasks_per_s": meta_batch / seconds,
        "peak_growth_mib": peak - base,
        "peak_abs_mib": peak,
    }


def measure_sampling(device: torch.device, rounds: int, meta_batch: int) -> dict:
    """Episodes/s from a mini-ImageNet-shaped tensor on `device`, plain and with the standard support
    augmentation, against the time of one Conv4 ProtoNet training step on such episodes."""
    generator = torch.Generator(device).manual_seed(SEED)
    images = torch.randint(0, 256, SAMPLING_SHAPE, dtype=torch.uint8, generator=generator, device=device)
    data = ClassImages.uniform(images)
    augment = Augment().resolve({"crop_padding": 8, "flip": True, "color_jitter": 0.4})
    samplers = {
        "plain": EpisodeSampler(data, N_WAY, K_SHOT, N_QUERY, "train", mean=MEAN, std=STD),
        "augmented": EpisodeSampler(data, N_WAY, K_SHOT, N_QUERY, "train", mean=MEAN, std=STD, augment=augment),
    }
    torch.manual_seed(SEED)
    learner = ProtoNet(conv4(list(SAMPLING_SHAPE[2:])), N_WAY).to(device)
    optimizer = torch.optim.Adam(learner.parameters(), lr=META_LR)

    def timed(fn) -> float:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        learner(samplers["plain"].sample(meta_batch, generator))[0].backward()
        optimizer.step()

    train_step()  # warm-up
    seconds: dict[str, list[float]] = {"plain": [], "augmented": [], "step": []}
    for r in range(rounds):
        # Rotating order, so that neither variant always runs right after the expensive step.
        for name in (["plain", "augmented", "step"][r % 3:] + ["plain", "augmented", "step"][: r % 3]):
            fn = train_step if name == "step" else lambda s=samplers[name]: s.sample(meta_batch, generator)
            seconds[name].append(timed(fn))
    return {"rounds": rounds, "meta_batch": meta_batch, "seconds": seconds}


def sampling_table(result: dict) -> str:
    seconds, meta_batch = result["seconds"], result["meta_batch"]
    step = statistics.median(seconds["step"])
    lines = [
        f"Episode sampling, {'x'.join(map(str, SAMPLING_SHAPE[2:]))} images ({SAMPLING_SHAPE[0]} classes x "
        f"{SAMPLING_SHAPE[1]}), {N_WAY}-way {K_SHOT}-shot {N_QUERY} queries, meta-batch {meta_batch}, "
        f"{result['rounds']} interleaved rounds (median, min-max):",
        "| sampling | episodes/s | spread | ms per meta-batch | share of a Conv4 ProtoNet step |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("plain", "augmented"):
        s = seconds[name]
        label = "gather + normalize" if name == "plain" else "gather + standard support augmentation + normalize"
        lines.append(f"| {label} | {meta_batch / statistics.median(s):.0f} | {meta_batch / max(s):.0f}-"
                     f"{meta_batch / min(s):.0f} | {1000 * statistics.median(s):.1f} "
                     f"| {100 * statistics.median(s) / (statistics.median(s) + step):.1f}% |")
    lines.append(f"\nConv4 ProtoNet training step on those episodes (forward, backward, Adam): median "
                 f"{1000 * step:.0f} ms (min-max {1000 * min(seconds['step']):.0f}-{1000 * max(seconds['step']):.0f})")
    return "\n".join(lines)


def meta_batch_of(config: Config, args: argparse.Namespace) -> int:
    """--meta-batch for the first table's Conv4, --meta-batch-84 for the 3x84x84 networks."""
    return args.meta_batch if config.backbone == "conv4" else args.meta_batch_84


def run_isolated(config: Config, device: torch.device, args: argparse.Namespace) -> dict:
    """`measure` in a fresh Python process."""
    command = [sys.executable, __file__, "--one", config.name, "--device", device.type,
               "--iters", str(args.iters), "--warmup", str(args.warmup), "--meta-batch", str(args.meta_batch),
               "--meta-batch-84", str(args.meta_batch_84), "--image-shape", *map(str, IMAGE_SHAPE)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{config.name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_all(configs: list[Config], device: torch.device, args: argparse.Namespace) -> list[dict]:
    """`run_isolated` for each config in turn, reporting each rate as it comes."""
    results = []
    for config in configs:
        results.append(run_isolated(config, device, args))
        print(f"  {config.name}: {rate_text(results[-1]['tasks_per_s'])} tasks/s", flush=True)
    return results


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{models[0]} ({len(models)} logical CPUs)" if models else "unknown CPU"


def implementation_label(config: Config, device: torch.device) -> str:
    if config.implementation == "plain":
        return "plain loop"
    if config.implementation == "auto":
        return f"metarun auto->{resolve_task_batching('auto', device)}"
    return "metarun" if config.method == "ProtoNet" else f"metarun {config.implementation}"


def rate_text(tasks_per_s: float) -> str:
    """One decimal; two significant digits below 1/s (a CPU's ResNet-12 episodes), not a bare 0.1."""
    return f"{tasks_per_s:.1f}" if tasks_per_s >= 1 else f"{tasks_per_s:.2g}"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def markdown_table(results: list[dict], device: torch.device) -> str:
    by_name = {r["name"]: r for r in results}
    lines = [
        "| method | implementation | order | inner steps | tasks/s | peak mem growth (MiB) | abs peak (MiB) "
        "| vs plain: speed | vs plain: memory |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        config = Config(**{field.name: r[field.name] for field in fields(Config)})
        plain = by_name[config.baseline.name]
        # The first table's Conv4 goes unnamed, as it always has; the 3x84x84 table names its networks.
        method = config.method if config.backbone == "conv4" else f"{config.method} ({BACKBONES[config.backbone].label})"
        order = "-" if config.method == "ProtoNet" else ("1st" if config.first_order else "2nd")
        steps = "-" if config.method == "ProtoNet" else str(config.adaptation_steps)
        lines.append(
            f"| {method} | {implementation_label(config, device)} | {order} | {steps} "
            f"| {rate_text(r['tasks_per_s'])} | {r['peak_growth_mib']:.0f} | {r['peak_abs_mib']:.0f} "
            f"| {ratio(r['tasks_per_s'], plain['tasks_per_s'])} "
            f"| {ratio(r['peak_growth_mib'], plain['peak_growth_mib'])} |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument("--iters", type=int, help="timed steps (default 5 on CPU, 20 on CUDA, 1 with --quick)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--meta-batch", type=int, default=32, help="tasks per meta-training step")
    parser.add_argument("--image-shape", type=int, nargs=3, default=IMAGE_SHAPE, metavar=("C", "H", "W"),
                        help="image shape of the synthetic meta-batch (default: Omniglot's 1 28 28)")
    parser.add_argument("--meta-batch-84", type=int,
                        help="tasks per step in the 3x84x84 table (default 2 on CPU, 32 on CUDA)")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--skip-84", action="store_true", help="skip the 3x84x84 ResNet-12 / Conv4-32 table")
    only.add_argument("--only-84", action="store_true", help="skip the first (Conv4, --image-shape) table")
    parser.add_argument("--rounds", type=int, help="interleaved sampling rounds (default 7, 2 with --quick)")
    parser.add_argument("--skip-sampling", action="store_true", help="skip the 84x84x3 sampling measurement")
    parser.add_argument("--out", help="write the raw numbers to this JSON file")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1 iteration, 1-step configs only, ProtoNet alone at 3x84x84")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one config, print JSON
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    if args.iters is None:
        args.iters = 1 if args.quick else (20 if device.type == "cuda" else 5)
    IMAGE_SHAPE[:] = args.image_shape
    if args.meta_batch_84 is None:
        args.meta_batch_84 = 32 if device.type == "cuda" else 2
    if args.rounds is None:
        args.rounds = 2 if args.quick else 7
    if args.one == "sampling":
        print(json.dumps(measure_sampling(device, args.rounds, min(args.meta_batch, 4 if device.type == "cpu" else 32))))
        return
    if args.one:
        config = {c.name: c for c in all_configs(quick=False) + mini_imagenet_configs(quick=False)}[args.one]
        print(json.dumps(measure(config, device, meta_batch_of(config, args), args.iters, args.warmup)))
        return

    started = time.perf_counter()
    load = os.getloadavg()[0]
    print(f"device: {device_name(device)} | torch {torch.__version__} | threads {torch.get_num_threads()} "
          f"| load average {load:.1f} at start")
    steps = f"{args.warmup} warmup + {args.iters} timed steps per config (median step), each in a fresh process"
    results = grad_diffs = results_84 = grad_diffs_84 = None
    if not args.only_84:
        print(f"{N_WAY}-way {K_SHOT}-shot, {N_QUERY} queries/class, {'x'.join(map(str, IMAGE_SHAPE))} images, "
              f"meta-batch {args.meta_batch}, {steps}\n")
        grad_diffs = check_gradients("conv4", args.meta_batch, device)
        results = run_all(all_configs(args.quick), device, args)
        print()
        print(markdown_table(results, device))
    if not args.skip_84:
        print(f"\n{N_WAY}-way {K_SHOT}-shot, {N_QUERY} queries/class, {'x'.join(map(str, MINI_IMAGENET_SHAPE))} "
              f"images, meta-batch {args.meta_batch_84}, {steps}; MAML with Conv4-32, ProtoNet with ResNet-12 "
              "(64-160-320-640), whose tasks/s are episodes/s\n")
        grad_diffs_84 = check_gradients("conv4-32", args.meta_batch_84, device)
        results_84 = run_all(mini_imagenet_configs(args.quick), device, args)
        print()
        print(markdown_table(results_84, device))
    sampling = None
    if not args.skip_sampling:
        command = [sys.executable, __file__, "--one", "sampling", "--device", device.type, "--rounds", str(args.rounds),
                   "--meta-batch", str(args.meta_batch)]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"sampling failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        sampling = json.loads(proc.stdout.strip().splitlines()[-1])
        print()
        print(sampling_table(sampling))
    total = time.perf_counter() - started
    print(f"\ntotal runtime {total:.0f} s")
    if args.out:
        report = {
            "device": device_name(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average_at_start": load,
            "meta_batch": args.meta_batch,
            "iters": args.iters,
            "warmup": args.warmup,
            "grad_check_relative_diff": grad_diffs,
            "meta_batch_84": args.meta_batch_84,
            "grad_check_relative_diff_84": grad_diffs_84,
            "total_seconds": total,
            "results": results,
            "results_84": results_84,
            "sampling": sampling,
        }
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
