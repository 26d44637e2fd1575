"""Meta-training throughput and peak memory: metarun against the libraries people would use instead
(higher, learn2learn, easyfsl) and a plain per-task loop, on the same data with the same model.

What: one meta-training step (meta-gradient, then an Adam step) on one fixed synthetic meta-batch
(5-way 1-shot, 15 queries per class, seeded), every implementation starting from the same weights:
  - second-order MAML, 1 and 5 inner steps (--inner-steps), and first-order MAML, 1 step, on Conv4
    (64 channels, 1x28x28: Omniglot's shape; --image-shape changes it), meta-batch --meta-batch (32):
      metarun          the default: `task_batching=auto`, `task_chunk=auto`, `task_workers=auto`
                       (on the CPU one backward pass per task; the tasks on one worker thread per
                       core, each with one intra-op thread, at 5 or more second-order inner
                       steps, where these rows measured it faster, else one after another; on
                       CUDA vmap over the whole meta-batch)
      metarun, one worker  `task_workers=1`: the tasks one after another on all intra-op threads
      metarun, one worker per core  `task_workers=C`: workers in every family
      metarun, whole   the whole meta-batch's graph in one backward pass (`task_chunk=32`; before
                       per-task accumulation this was the CPU default)
      metarun, vmap    (CUDA, or --vmap) `task_batching=vmap`, the whole batch and chunks of 8
      plain loop       the original MAML code's formulation, written here: per task,
                       `autograd.grad(create_graph=True)` inner steps and `functional_call`, one
                       `backward()` per task
      higher, learn2learn  as their own MAML examples do it (scripts/peers.py)
  - ProtoNet on the same Conv4 and meta-batch: metarun (`task_chunk=auto`), metarun whole, the
    plain per-task loop, and easyfsl's PrototypicalNetworks (its own formulation: minus the
    euclidean distance, support and query embedded in two calls; so no gradient check for it).
  - with --with-84: the same on 3x84x84 (mini-ImageNet's shape) at --meta-batch-84 tasks (2 on
    the CPU, 32 on CUDA): second-order MAML on Conv4-32 (1 step) and ProtoNet on ResNet-12.
How:
  - Each variant runs in a process of its own, as it would for its user: metarun's with glibc
    keeping freed memory (metarun.device.keep_freed_memory, which metarun's trainer sets on the
    CPU), the peers and the plain loop with glibc's defaults; "metarun, glibc defaults" shows
    metarun without it. The processes of one family ("family": the variants computing the same
    step) stay up side by side, idle but for the one being timed.
  - Speed: after a warm-up step each, the variants are timed interleaved: every round times one
    step of each, in an order that rotates from round to round (scripts/rounds.py); tasks/s is from
    the median round, ratios are taken within each round and their median and min-max over rounds
    are printed. Before timing, each variant's meta-gradient on the first 4 tasks is checked
    equal to the plain loop's in float64 (relative difference <= 1e-8: in float32, five inner
    steps amplify rounding differences to 1e-3 and more, so no float32 tolerance both holds and
    catches a wrong gradient); a variant that differs stops the script.
  - Memory: in the same processes, on CPU the growth of peak RSS (VmHWM, not `ru_maxrss`, which
    Linux carries over from the parent) from after building model and data to the end of the
    rounds, and the absolute peak; on CUDA `torch.cuda.max_memory_allocated()`.
  - Then episode sampling from a mini-ImageNet-shaped uint8 tensor (64 classes x 600 images x
    3x84x84) against a Conv4 ProtoNet step on those episodes, interleaved the same way.

    python scripts/bench.py [--device cpu|cuda|auto] [--rounds 7] [--meta-batch 32] [--inner-steps 1 5]
                            [--image-shape 1 28 28] [--with-84 | --only-84] [--meta-batch-84 N]
                            [--skip-sampling] [--vmap] [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peers  # noqa: E402  (scripts/peers.py)
from rounds import Spread, interleaved_rounds, speed_ratio  # noqa: E402  (scripts/rounds.py)

from metarun.algorithms.maml import MAML  # noqa: E402
from metarun.algorithms.protonet import ProtoNet  # noqa: E402
from metarun.data.augment import Augment  # noqa: E402
from metarun.data.contract import ClassImages  # noqa: E402
from metarun.data.miniimagenet import MEAN, STD  # noqa: E402
from metarun.data.sampler import EpisodeSampler  # noqa: E402
from metarun.data.tasks import TaskBatch  # noqa: E402
from metarun.device import keep_freed_memory, resolve_device  # noqa: E402
from metarun.models.conv4 import Conv4  # noqa: E402
from metarun.models.layers import Classifier  # noqa: E402
from metarun.models.resnet12 import ResNet12  # noqa: E402
from metarun.task_workers import resolve_task_workers  # noqa: E402
from metarun.trainer import meta_backward  # noqa: E402

N_WAY, K_SHOT, N_QUERY = 5, 1, 15
IMAGE_SHAPE = [1, 28, 28]  # --image-shape rewrites it in place; the default is Omniglot's
MINI_IMAGENET_SHAPE = (3, 84, 84)
SAMPLING_SHAPE = (
    64,
    600,
    3,
    84,
    84,
)  # mini-ImageNet's training part: classes, images each, C, H, W
INNER_LR, META_LR = 0.4, 1e-3
SEED = 0
GRAD_TOLERANCE = 1e-8  # relative, float64: ||g - g_plain|| / ||g_plain||
CHECKED_TASKS = 4  # the gradient check's share of the meta-batch
MIB = 2**20

BACKBONES: dict[str, tuple[str, Callable[[Sequence[int]], nn.Module], Sequence[int]]] = {
    # key: (label, build(image_shape), image shape)
    "conv4": (
        "Conv4",
        lambda shape: Conv4(in_channels=shape[0], image_size=shape[-1]),
        IMAGE_SHAPE,
    ),
    "conv4-32": (
        "Conv4-32",
        lambda shape: Conv4(in_channels=shape[0], hidden=32, image_size=shape[-1]),
        MINI_IMAGENET_SHAPE,
    ),
    "resnet12": (
        "ResNet-12",
        lambda shape: ResNet12(in_channels=shape[0], image_size=shape[-1]),
        MINI_IMAGENET_SHAPE,
    ),
}
PEER_NAMES = tuple(peers.PEERS)


@dataclass(frozen=True)
class Family:
    """Variants computing the same meta-training step, timed against each other in interleaved rounds."""

    method: str  # "MAML" or "ProtoNet"
    first_order: bool = False
    adaptation_steps: int = 0
    backbone: str = "conv4"

    @property
    def key(self) -> str:
        name = (
            "protonet"
            if self.method == "ProtoNet"
            else f"{'fomaml' if self.first_order else 'maml2'}-{self.adaptation_steps}"
        )
        return f"{name}-{self.backbone}"

    @property
    def image_shape(self) -> Sequence[int]:
        return BACKBONES[self.backbone][2]

    @property
    def description(self) -> str:
        network = f"{BACKBONES[self.backbone][0]} on {'x'.join(map(str, self.image_shape))}"
        if self.method == "ProtoNet":
            return f"ProtoNet, {network}"
        return f"MAML {'1st' if self.first_order else '2nd'} order, {self.adaptation_steps} inner step(s), {network}"


def families(
    quick: bool, with_84: bool, only_84: bool, inner_steps: Sequence[int] = (1, 5)
) -> list[Family]:
    first = [
        *(Family("MAML", False, steps) for steps in inner_steps),
        Family("MAML", True, 1),
        Family("ProtoNet"),
    ]
    if quick:
        first = [Family("MAML", False, 1), Family("ProtoNet")]
    second = [Family("MAML", False, 1, "conv4-32"), Family("ProtoNet", backbone="resnet12")]
    return ([] if only_84 else first) + (second if with_84 or only_84 else [])


# metarun's variants: their learner settings given the meta-batch size T.
METARUN_VARIANTS: dict[str, Callable[[int], dict]] = {
    "metarun": lambda T: {},  # the defaults: task_batching=auto, task_chunk=auto, task_workers=auto
    "metarun-1worker": lambda T: {"task_workers": 1},  # one task after another (the default before)
    "metarun-workers": lambda T: {
        "task_workers": torch.get_num_threads()
    },  # workers, also where auto takes none
    "metarun-glibc": lambda T: {},  # the same in a process with glibc's defaults
    "metarun-whole": lambda T: {"task_batching": "loop", "task_chunk": T},
    "metarun-loop": lambda T: {"task_batching": "loop", "task_chunk": 1},
    "metarun-vmap": lambda T: {"task_batching": "vmap", "task_chunk": T},
    "metarun-vmap-8": lambda T: {"task_batching": "vmap", "task_chunk": 8},
    # MAML++ (Antoniou et al., 2019) with every option on, its multi-step loss at its start (a query
    # pass after every inner step), and without that loss: LSLR and per-step batch norm must cost no
    # memory beyond MAML's (they add parameters, not per-task graphs). Another loss than the plain
    # loop's: no gradient check (same_formulation).
    "metarun-mamlpp": lambda T: {"msl_steps": 10**9, "lslr": True, "per_step_bn": True},
    "metarun-lslr-bn": lambda T: {"lslr": True, "per_step_bn": True},
}
MAMLPP_VARIANTS = ("metarun-mamlpp", "metarun-lslr-bn")
LABELS = {
    "metarun": "metarun (default)",
    "metarun-glibc": "metarun (default), glibc defaults",
    "metarun-1worker": "metarun, one worker (task_workers=1: the tasks one after another)",
    "metarun-workers": "metarun, one worker per core (task_workers=C, one thread each)",
    "metarun-whole": "metarun, one backward for the whole batch",
    "metarun-loop": "metarun, loop, one backward per task",
    "metarun-vmap": "metarun, vmap, whole batch",
    "metarun-vmap-8": "metarun, vmap, chunks of 8 tasks",
    "metarun-mamlpp": "metarun MAML++ (MSL at its start, LSLR, per-step BN)",
    "metarun-lslr-bn": "metarun MAML++ without MSL (LSLR, per-step BN)",
    "plain": "plain loop, one backward per task",
    "higher": "higher 0.2.1 (its MAML example)",
    "learn2learn": "learn2learn 0.2.0 (its MAML example)",
    "easyfsl": "easyfsl 1.5.0 PrototypicalNetworks",
}


def variants(family: Family, device: torch.device, vmap: bool) -> list[str]:
    """The implementations compared in `family` (peers only where they import)."""
    installed = [name for name, error in peers.available().items() if error is None]
    found = [name for name in installed if peers.PEERS[name][0] == family.method]
    if family.method == "ProtoNet":
        cpu_only = (
            ["metarun-1worker", "metarun-workers", "metarun-glibc"] if device.type == "cpu" else []
        )
        ours = ["metarun", "metarun-whole", *cpu_only]
        return [*ours, "plain", *found]
    if device.type == "cuda":
        ours = [
            "metarun",
            "metarun-vmap-8",
            "metarun-loop",
        ]  # the default is vmap over the whole batch
    else:
        ours = [
            "metarun",
            "metarun-1worker",
            "metarun-workers",
            "metarun-glibc",
            "metarun-whole",
        ] + (["metarun-vmap", "metarun-vmap-8"] if vmap else [])
    return [*ours, *MAMLPP_VARIANTS, "plain", *found]


def synthetic_tasks(meta_batch: int, device: torch.device, image_shape: Sequence[int]) -> TaskBatch:
    """Random images with labels 0..N-1 in class order; seeded, so every process sees the same batch."""
    generator = torch.Generator().manual_seed(SEED)
    support_x = torch.randn(
        meta_batch, N_WAY * K_SHOT, *image_shape, generator=generator
    )  # [T, N*K, C, H, W]
    query_x = torch.randn(
        meta_batch, N_WAY * N_QUERY, *image_shape, generator=generator
    )  # [T, N*Q, C, H, W]
    support_y = torch.arange(N_WAY).repeat_interleave(K_SHOT).expand(meta_batch, -1)  # [T, N*K]
    query_y = torch.arange(N_WAY).repeat_interleave(N_QUERY).expand(meta_batch, -1)  # [T, N*Q]
    return TaskBatch(support_x, support_y.contiguous(), query_x, query_y.contiguous(), N_WAY).to(
        device
    )


def initial_model(family: Family) -> nn.Module:
    """The seeded network every implementation in `family` starts from: a Classifier for MAML, the
    embedding backbone for ProtoNet."""
    torch.manual_seed(SEED)
    label, make, shape = BACKBONES[family.backbone]
    network = make(shape)
    return Classifier(network, N_WAY) if family.method == "MAML" else network


def plain_maml(model: nn.Module, family: Family) -> Callable[[TaskBatch], None]:
    """MAML as the original code writes it, one task at a time: inner steps by `autograd.grad`,
    the query loss with the fast weights, divided by T and backpropagated before the next task."""

    def backward(tasks: TaskBatch) -> None:
        params = dict(model.named_parameters())
        for i in range(len(tasks)):
            fast = params
            for _ in range(family.adaptation_steps):
                support_loss = F.cross_entropy(
                    functional_call(model, fast, (tasks.support_x[i],)), tasks.support_y[i]
                )
                grads = torch.autograd.grad(
                    support_loss, list(fast.values()), create_graph=not family.first_order
                )
                fast = {name: w - INNER_LR * g for (name, w), g in zip(fast.items(), grads)}
            query_loss = F.cross_entropy(
                functional_call(model, fast, (tasks.query_x[i],)), tasks.query_y[i]
            )
            (query_loss / len(tasks)).backward()

    return backward


def plain_protonet(model: nn.Module) -> Callable[[TaskBatch], None]:
    """ProtoNet one episode at a time: support and queries embedded together, class means of the
    support embeddings, negative squared distances as logits; each episode's loss divided by T and
    backpropagated before the next."""

    def backward(tasks: TaskBatch) -> None:
        n_support = tasks.support_x.shape[1]
        for i in range(len(tasks)):
            emb = model(torch.cat([tasks.support_x[i], tasks.query_x[i]])[None])[
                0
            ]  # [N*K + N*Q, D]
            support_emb, query_emb = emb[:n_support], emb[n_support:]
            prototypes = torch.stack(
                [support_emb[tasks.support_y[i] == n].mean(dim=0) for n in range(N_WAY)]
            )  # [N, D]
            logits = -(query_emb[:, None] - prototypes[None]).square().sum(dim=-1)  # [N*Q, N]
            (F.cross_entropy(logits, tasks.query_y[i]) / len(tasks)).backward()

    return backward


def build(
    family: Family, variant: str, meta_batch: int, device: torch.device
) -> tuple[nn.Module, Callable[[TaskBatch], object]]:
    """The network holding the meta-parameters (named as in `initial_model`) and a function that
    accumulates the meta-gradient of a task batch into its `.grad`."""
    model = initial_model(family).to(device)
    if variant == "plain":
        return model, plain_maml(model, family) if family.method == "MAML" else plain_protonet(
            model
        )
    if variant in peers.PEERS:
        if family.method == "MAML":
            return model, peers.PEERS[variant][1](
                model, INNER_LR, family.adaptation_steps, family.first_order
            )
        return model, peers.PEERS[variant][1](model)
    learner = metarun_learner(family, model, device, **METARUN_VARIANTS[variant](meta_batch))
    return model, lambda tasks: meta_backward(learner, tasks)


def metarun_learner(
    family: Family, model: nn.Module, device: torch.device, task_workers="auto", **settings
) -> nn.Module:
    """metarun's learner of `family` over `model` (`initial_model`'s) with the learner `settings`,
    its task workers resolved as the trainer resolves them (default: the trainer's, auto)."""
    if family.method == "MAML":
        learner = MAML(
            model.backbone,
            N_WAY,
            inner_lr=INNER_LR,
            adaptation_steps=family.adaptation_steps,
            first_order=family.first_order,
            **settings,
        )
        learner.model = model  # the Classifier itself, so its parameters carry the same names
    else:
        learner = ProtoNet(model, N_WAY, task_chunk=settings.get("task_chunk", "auto"))
    learner.task_workers = resolve_task_workers(task_workers, learner, device)
    return learner


def same_formulation(variant: str) -> bool:
    """Whether `variant` computes metarun's loss (easyfsl's ProtoNet does not: see scripts/peers.py;
    nor do the MAML++ variants, by design)."""
    return variant != "easyfsl" and variant not in MAMLPP_VARIANTS


def meta_gradient(
    model: nn.Module, backward: Callable[[TaskBatch], object], tasks: TaskBatch
) -> Tensor:
    model.zero_grad(set_to_none=True)
    backward(tasks)
    flat = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return flat


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:  # this process image's peak RSS (see the top)
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024


def serve(family: Family, variant: str, meta_batch: int, device: torch.device) -> None:
    """A worker process for one variant: builds it, prints "ready", then answers each line of
    stdin: "step" runs one training step and prints "done"; "memory" prints its peak memory as JSON."""
    if variant.startswith("metarun") and variant != "metarun-glibc" and device.type == "cpu":
        keep_freed_memory()  # as metarun's trainer does before it builds anything
    tasks = synthetic_tasks(meta_batch, device, family.image_shape)
    model, backward = build(family, variant, meta_batch, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=META_LR)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else peak_bytes(device)
    print("ready", flush=True)
    for command in sys.stdin:
        if command.strip() == "step":
            optimizer.zero_grad(set_to_none=True)
            backward(tasks)
            optimizer.step()
            sync(device)
            print("done", flush=True)
        else:
            peak = peak_bytes(device)
            print(
                json.dumps({"peak_growth_mib": (peak - base) / MIB, "peak_abs_mib": peak / MIB}),
                flush=True,
            )


def check_gradients(
    family: Family, names: list[str], meta_batch: int, device: torch.device
) -> dict[str, float]:
    """Relative difference of each variant's float64 meta-gradient on the first CHECKED_TASKS tasks
    from the plain loop's (variants with metarun's loss only)."""
    tasks = synthetic_tasks(meta_batch, device, family.image_shape)[:CHECKED_TASKS]
    tasks.support_x, tasks.query_x = tasks.support_x.double(), tasks.query_x.double()

    def gradient(name: str) -> Tensor:
        model, backward = build(family, name, meta_batch, device)
        return meta_gradient(model.double(), backward, tasks)

    reference = gradient("plain")
    return {
        name: ((gradient(name) - reference).norm() / reference.norm()).item()
        for name in names
        if name != "plain" and same_formulation(name)
    }


class Worker:
    """This script in `serve` mode, in a process of its own, spoken to line by line."""

    def __init__(self, args: argparse.Namespace, family: Family, variant: str, folder: str):
        self.variant = variant
        self.stderr = open(os.path.join(folder, f"{variant}.stderr"), "w+")
        command = [sys.executable, __file__, "--serve", family.key, variant, *forwarded_args(args)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True
        )

    def ask(self, line: str | None = None) -> str:
        """Send `line` (if any) and return the worker's answer; exits with its stderr if it died."""
        if line is not None:
            self.process.stdin.write(line + "\n")
            self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            self.stderr.seek(0)
            sys.exit(
                f"{self.variant} failed (exit {self.process.wait()}):\n{self.stderr.read()[-3000:]}"
            )
        return answer.strip()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()
        self.stderr.close()


def run_family(family: Family, args: argparse.Namespace, device: torch.device) -> dict:
    """Every variant of `family` in its own worker: gradient check, interleaved rounds, memory."""
    names = variants(family, device, args.vmap)
    grad_diffs = check_gradients(family, names, meta_batch_of(family, args), device)
    with tempfile.TemporaryDirectory() as folder:
        workers = {name: Worker(args, family, name, folder) for name in names}
        for worker in workers.values():
            worker.ask()  # "ready": built
        steps = {
            name: (lambda worker=worker: worker.ask("step")) for name, worker in workers.items()
        }
        seconds = interleaved_rounds(steps, args.rounds, warmup=1)
        memory = {name: json.loads(worker.ask("memory")) for name, worker in workers.items()}
        for worker in workers.values():
            worker.close()
    return {
        "family": family.key,
        "meta_batch": meta_batch_of(family, args),
        "variants": names,
        "grad_diffs": grad_diffs,
        "seconds": seconds,
        "memory": memory,
    }


def forwarded_args(args: argparse.Namespace) -> list[str]:
    """The settings a worker process needs from the command line."""
    return [
        "--device",
        args.device,
        "--rounds",
        str(args.rounds),
        "--meta-batch",
        str(args.meta_batch),
        "--meta-batch-84",
        str(args.meta_batch_84),
        "--image-shape",
        *map(str, IMAGE_SHAPE),
        "--inner-steps",
        *map(str, args.inner_steps),
    ]


def meta_batch_of(family: Family, args: argparse.Namespace) -> int:
    return args.meta_batch if family.backbone == "conv4" else args.meta_batch_84


def rate_text(tasks_per_s: float) -> str:
    """One decimal; two significant digits below 1/s (a CPU's ResNet-12 episodes), not a bare 0.1."""
    return f"{tasks_per_s:.1f}" if tasks_per_s >= 1 else f"{tasks_per_s:.2g}"


def ratio_text(spread: Spread) -> str:
    return f"{spread.median:.2f}x ({spread.low:.2f}-{spread.high:.2f})"


def family_table(family: Family, timing: dict) -> str:
    """The markdown rows of one family: speed (median and spread over rounds), speed ratios within
    rounds against the plain loop and the fastest peer, memory and its ratio to the leanest peer."""
    seconds, meta_batch, memory = timing["seconds"], timing["meta_batch"], timing["memory"]
    medians = {name: Spread.of(s).median for name, s in seconds.items()}
    found = [name for name in seconds if name in PEER_NAMES]
    fastest_peer = min(found, key=medians.get) if found else None
    leanest_peer = min(found, key=lambda name: memory[name]["peak_growth_mib"]) if found else None
    lines = []
    for name, s in seconds.items():
        rate = Spread.of([meta_batch / x for x in s])
        vs_peer = ratio_text(speed_ratio(seconds, name, fastest_peer)) if fastest_peer else "-"
        mem = memory[name]["peak_growth_mib"]
        mem_vs_peer = (
            f"{mem / memory[leanest_peer]['peak_growth_mib']:.2f}x" if leanest_peer else "-"
        )
        lines.append(
            f"| {family.description} | {LABELS[name]} | {rate_text(rate.median)} | {rate_text(rate.low)}-"
            f"{rate_text(rate.high)} | {ratio_text(speed_ratio(seconds, name, 'plain'))} | {vs_peer} "
            f"| {mem:.0f} | {memory[name]['peak_abs_mib']:.0f} | {mem_vs_peer} |"
        )
    return "\n".join(lines)


TABLE_HEADER = (
    "| family | implementation | tasks/s (median) | spread over rounds | speed vs plain loop: median (min-max) "
    "| speed vs fastest peer | peak mem growth (MiB) | abs peak (MiB) | memory vs leanest peer |\n"
    "|---|---|---:|---:|---:|---:|---:|---:|---:|"
)


def measure_sampling(device: torch.device, rounds: int, meta_batch: int) -> dict:
    """Episodes/s from a mini-ImageNet-shaped tensor on `device`, plain and with the standard support
    augmentation, against one Conv4 ProtoNet training step on such episodes, interleaved."""
    generator = torch.Generator(device).manual_seed(SEED)
    images = torch.randint(
        0, 256, SAMPLING_SHAPE, dtype=torch.uint8, generator=generator, device=device
    )
    data = ClassImages.uniform(images)
    augment = Augment().resolve({"crop_padding": 8, "flip": True, "color_jitter": 0.4})
    samplers = {
        "plain": EpisodeSampler(data, N_WAY, K_SHOT, N_QUERY, "train", mean=MEAN, std=STD),
        "augmented": EpisodeSampler(
            data, N_WAY, K_SHOT, N_QUERY, "train", mean=MEAN, std=STD, augment=augment
        ),
    }
    torch.manual_seed(SEED)
    learner = ProtoNet(Conv4(in_channels=3, image_size=SAMPLING_SHAPE[-1]), N_WAY).to(device)
    optimizer = torch.optim.Adam(learner.parameters(), lr=META_LR)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        meta_backward(learner, samplers["plain"].sample(meta_batch, generator))
        optimizer.step()

    steps = {
        name: (lambda s=sampler: s.sample(meta_batch, generator))
        for name, sampler in samplers.items()
    }
    seconds = interleaved_rounds(
        {**steps, "step": train_step}, rounds, warmup=1, sync=lambda: sync(device)
    )
    return {"rounds": rounds, "meta_batch": meta_batch, "seconds": seconds}


def sampling_table(result: dict) -> str:
    seconds, meta_batch = result["seconds"], result["meta_batch"]
    step = Spread.of(seconds["step"])
    lines = [
        f"Episode sampling, {'x'.join(map(str, SAMPLING_SHAPE[2:]))} images ({SAMPLING_SHAPE[0]} classes x "
        f"{SAMPLING_SHAPE[1]}), {N_WAY}-way {K_SHOT}-shot {N_QUERY} queries, meta-batch {meta_batch}, "
        f"{result['rounds']} interleaved rounds (median, min-max):",
        "| sampling | episodes/s | spread | ms per meta-batch | share of a Conv4 ProtoNet step |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, label in (
        ("plain", "gather + normalize"),
        ("augmented", "gather + standard support augmentation + normalize"),
    ):
        s = Spread.of(seconds[name])
        lines.append(
            f"| {label} | {meta_batch / s.median:.0f} | {meta_batch / s.high:.0f}-{meta_batch / s.low:.0f} "
            f"| {1000 * s.median:.1f} | {100 * s.median / (s.median + step.median):.1f}% |"
        )
    lines.append(
        f"\nConv4 ProtoNet training step on those episodes (forward, backward, Adam): median "
        f"{1000 * step.median:.0f} ms (min-max {1000 * step.low:.0f}-{1000 * step.high:.0f})"
    )
    return "\n".join(lines)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{models[0]} ({len(models)} logical CPUs)" if models else "unknown CPU"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    parser.add_argument(
        "--rounds", type=int, help="interleaved timing rounds (default 7; 2 with --quick)"
    )
    parser.add_argument("--meta-batch", type=int, default=32, help="tasks per meta-training step")
    parser.add_argument(
        "--inner-steps",
        type=int,
        nargs="+",
        default=[1, 5],
        help="inner steps of the second-order MAML families (default 1 5)",
    )
    parser.add_argument(
        "--image-shape",
        type=int,
        nargs=3,
        default=IMAGE_SHAPE,
        metavar=("C", "H", "W"),
        help="image shape of the first table's synthetic tasks (default: Omniglot's 1 28 28)",
    )
    parser.add_argument(
        "--meta-batch-84", type=int, help="tasks per step at 3x84x84 (default 2 on CPU, 32 on CUDA)"
    )
    only = parser.add_mutually_exclusive_group()
    only.add_argument(
        "--with-84", action="store_true", help="also the 3x84x84 Conv4-32 / ResNet-12 families"
    )
    only.add_argument("--only-84", action="store_true", help="only the 3x84x84 families")
    parser.add_argument(
        "--skip-sampling", action="store_true", help="skip the episode sampling measurement"
    )
    parser.add_argument(
        "--vmap", action="store_true", help="also time metarun's vmap variants on the CPU (slow)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 rounds, fewer families")
    parser.add_argument("--out", help="write the raw numbers to this JSON file")
    # internal: a worker process for one variant (see serve), or the sampling measurement
    parser.add_argument("--serve", nargs=2, metavar=("FAMILY", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--sampling", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    args.device = device.type
    IMAGE_SHAPE[:] = args.image_shape
    args.rounds = args.rounds or (2 if args.quick else 7)
    if args.meta_batch_84 is None:
        args.meta_batch_84 = 32 if device.type == "cuda" else 2
    if args.serve:  # internal modes, each in a process of its own
        every = families(False, True, False, args.inner_steps)
        family = {family.key: family for family in every}[args.serve[0]]
        serve(family, args.serve[1], meta_batch_of(family, args), device)
        return
    if args.sampling:
        if device.type == "cpu":
            keep_freed_memory()  # the ProtoNet step runs as the trainer runs it
        print(
            json.dumps(measure_sampling(device, args.rounds, 4 if device.type == "cpu" else 32)),
            flush=True,
        )
        return

    started = time.perf_counter()
    load = os.getloadavg()[0]
    missing = {name: error for name, error in peers.available().items() if error}
    print(
        f"device: {device_name(device)} | torch {torch.__version__} | threads {torch.get_num_threads()} "
        f"| load average {load:.1f} at start"
    )
    print(
        f"{N_WAY}-way {K_SHOT}-shot, {N_QUERY} queries/class; {args.rounds} interleaved rounds per family "
        f"after a warm-up step; each variant in its own process, memory over all its steps"
    )
    for name, error in missing.items():
        print(
            f"{name} is not installed (bash scripts/install_peers.sh installs it): its rows are left out ({error})"
        )
    report = {
        "device": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_at_start": load,
        "rounds": args.rounds,
        "families": [],
    }
    tables = []
    for family in families(args.quick, args.with_84, args.only_84, args.inner_steps):
        print(f"\n{family.description}, meta-batch {meta_batch_of(family, args)}:", flush=True)
        timing = run_family(family, args, device)
        for name, diff in timing["grad_diffs"].items():
            print(f"  meta-gradient check: {name} vs plain loop, relative difference {diff:.1e}")
            if diff > GRAD_TOLERANCE:
                sys.exit(
                    f"{name}'s meta-gradient differs from the plain loop's on {family.description}; the table "
                    "would compare different computations. Fix the gradient before benchmarking."
                )
        tables.append(family_table(family, timing))
        print(tables[-1], flush=True)
        report["families"].append(timing)
    print("\n" + TABLE_HEADER + "\n" + "\n".join(tables))
    if not args.skip_sampling:
        proc = subprocess.run(
            [sys.executable, __file__, "--sampling", *forwarded_args(args)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            sys.exit(f"sampling failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        report["sampling"] = json.loads(proc.stdout.strip().splitlines()[-1])
        print("\n" + sampling_table(report["sampling"]))
    report["total_seconds"] = time.perf_counter() - started
    print(f"\ntotal runtime {report['total_seconds']:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
