"""Test-time heads: metarun's batched heads against easyfsl's per-task classifiers, on the same
synthetic embeddings: episodes per second, accuracy, peak memory.

What: every head of conf/head/ (or --heads) on E fixed episodes of 640-wide embeddings (ResNet-12's
size), 5-way --shot-shot (1), 15 queries per class. One "step" is the head on all E episodes:
  - metarun     `named_head(NAME)` with conf/head/NAME.yaml's settings, called on chunks of --batch
                (50, eval.batch_size's default) episodes at once, [T, N*K, D] -> [T, N*Q, N]
  - easyfsl     where easyfsl 1.5 has the method (centroid: PrototypicalNetworks, simpleshot:
                SimpleShot, finetune: Finetune, tim: TIM, laplacianshot: LaplacianShot, bdcspn:
                BDCSPN, ptmap: PTMAP, transductive_finetune: TransductiveFinetuning), as its own
                examples use it: `backbone=nn.Identity()`, then per task `process_support_set` and
                `forward(query)`. Its hyperparameters are set to the metarun head's YAML wherever
                the two have the same knob; the table's notes say where they still differ.
E is 600 (eval.episodes' default) for the cheap heads and fewer for the iterative ones
(DEFAULT_EPISODES; --episodes sets one count for all): easyfsl's TIM runs 1000 Adam steps a task,
its PT-MAP up to 1000 Sinkhorn iterations per update, so 600 of their episodes take minutes a round.
The embeddings: per episode a centre per class ~ N(0, I), items = ReLU(centre + NOISE * N(0, I))
(non-negative, as ResNet features after a ReLU, which PT-MAP's power transform assumes), episode
after episode from one seeded generator, so episode i is the same whatever E; NOISE puts
ProtoNet near 75% in 1-shot (99.8% in 5-shot: a harder --shot 5 needs a larger NOISE).
SimpleShot's base mean is the mean of ReLU(centre + noise) over 64 other classes from the same
generator. Every head and implementation sees the same tensors.
How:
  - Each implementation of a head runs in a process of its own (metarun's with glibc keeping freed
    memory, as metarun-eval sets it on the CPU; easyfsl's with glibc's defaults); both processes of
    a head stay up, idle but for the one being timed, and answer "step" and "result" lines.
  - Speed: after a warm-up on 2 episodes each, interleaved rounds (scripts/rounds.py): each round
    times one step of each implementation, in an order that rotates; episodes/s from the median
    round with the min-max spread, and the speed ratio metarun/easyfsl taken within each round,
    its median and min-max. Everything under torch.no_grad() (the fine-tuning heads of both
    libraries enable gradients inside), on --threads torch threads (default: torch's own). On a
    shared machine use --threads 1: on 2 cores with other jobs running, torch's 2 threads made
    these small ops 30-150x slower (each op waits for a thread the kernel has descheduled).
  - Accuracy: each episode's accuracy over its queries, from the last round's step (the steps are
    deterministic; a head whose rounds disagree is flagged); mean ± 1.96 std/sqrt(E) as
    metarun.evaluation reports it, and the paired difference metarun - easyfsl over the same
    episodes with its 95% CI (metarun.stats.paired_difference).
  - Memory: growth of peak RSS (VmHWM) from after the embeddings are built to after the last round.
The goal: metarun at least 5x faster than easyfsl at equal accuracy;
the ratios are printed, nothing is asserted.

    python scripts/bench_heads.py [--rounds 5] [--episodes E] [--shot 1] [--batch 50]
                                  [--heads NAME ...] [--threads N] [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import device_name, peak_bytes, rate_text, ratio_text  # noqa: E402  (scripts/bench.py)
from rounds import Spread, interleaved_rounds, speed_ratio  # noqa: E402  (scripts/rounds.py)

from metarun.device import keep_freed_memory  # noqa: E402
from metarun.evaluation import confidence_interval  # noqa: E402
from metarun.heads.base import Head  # noqa: E402
from metarun.heads.named import head_names, named_head  # noqa: E402
from metarun.stats import paired_difference  # noqa: E402

N_WAY, N_QUERY, DIM = 5, 15, 640
NOISE = 2.5  # ProtoNet ~75% at 1-shot (3.0: ~60%, 2.0: ~93%)
BASE_CLASSES, BASE_ITEMS = 64, 20  # SimpleShot's base set: mini-ImageNet's 64 training classes
SEED = 0
WARMUP_EPISODES = 2
MIB = 2**20
# Episodes per step where 600 (eval.episodes) would take easyfsl minutes a round on 2 CPU cores.
DEFAULT_EPISODES = {"tim": 20, "ptmap": 30, "finetune": 100, "transductive_finetune": 200}
FULL_EPISODES = 600
QUICK_DIVISOR = 6  # --quick: a sixth of each count (600 -> 100), at least 2 episodes


@dataclass(frozen=True)
class Peer:
    """easyfsl's counterpart of a metarun head: its class, its settings given the metarun head
    (and the shot), and how the two still differ."""

    cls: str
    settings: Callable[[Head, int], dict]
    note: str


def finetune_steps(head: Head, shot: int) -> int:
    """The SGD steps metarun's finetune takes: epochs x batches of the support set."""
    return head.sgd["epochs"] * math.ceil(N_WAY * shot / head.sgd["batch_size"])


PEERS: dict[str, Peer] = {
    "centroid": Peer(
        "PrototypicalNetworks",
        lambda head, shot: {},
        "easyfsl's logits are -distance, metarun's -squared distance: the same argmax",
    ),
    "simpleshot": Peer(
        "SimpleShot",
        lambda head, shot: {},
        "not the same formulation: easyfsl's is the cosine to the prototypes without centring, "
        "metarun's CL2N centres on the base mean, normalizes, then the nearest mean",
    ),
    "finetune": Peer(
        "Finetune",
        lambda head, shot: {"fine_tuning_steps": finetune_steps(head, shot)},
        "steps = metarun's SGD steps (epochs x support batches); otherwise not the same "
        "formulation: metarun's Baseline is a new linear head by SGD (lr 0.01, momentum 0.9, "
        "batches of 4, weight decay 1e-3), easyfsl's fine-tunes cosine prototypes by full-batch "
        "Adam (its lr 1e-4 and temperature 1 kept: another optimizer, so not the same knob)",
    ),
    "tim": Peer(
        "TIM",
        lambda head, shot: {
            "fine_tuning_steps": head.iterations,
            "fine_tuning_lr": head.lr,
            "cross_entropy_weight": head.cross_entropy_weight,
            "marginal_entropy_weight": head.marginal_entropy_weight,
            "conditional_entropy_weight": head.conditional_entropy_weight,
            "temperature": head.temperature,
        },
        "steps, lr, the three loss weights and tau set to metarun's; classifier differs: "
        "easyfsl tau*cos(z, w), metarun the paper's -tau/2 ||z - w||^2 on L2-normalized z",
    ),
    "laplacianshot": Peer(
        "LaplacianShot",
        lambda head, shot: {
            "inference_steps": head.iterations,
            "knn": head.knn,
            "lambda_regularization": head.lambda_regularization,
        },
        "steps, knn, lambda set to metarun's; easyfsl leaves the embeddings unnormalized and "
        "rectifies with exp(cos) (eps 1), metarun normalizes and uses eps 10",
    ),
    "bdcspn": Peer(
        "BDCSPN",
        lambda head, shot: {},
        "no knobs in easyfsl: its weights exp(cos) (eps 1, metarun 10), unnormalized embeddings, "
        "unshifted queries scored",
    ),
    "ptmap": Peer(
        "PTMAP",
        lambda head, shot: {
            "fine_tuning_steps": head.iterations,
            "fine_tuning_lr": head.alpha,
            "lambda_regularization": head.lambda_regularization,
            "power_factor": head.beta,
        },
        "steps, alpha, lambda, beta set to metarun's; easyfsl skips the authors' normalization "
        "and centring after the power transform",
    ),
    "transductive_finetune": Peer(
        "TransductiveFinetuning",
        lambda head, shot: {
            "fine_tuning_steps": head.fine_tuning_steps,
            "fine_tuning_lr": head.fine_tuning_lr,
            "temperature": head.temperature,
        },
        "steps, lr, temperature set to metarun's (entropy weight 1 in both); classifier differs: "
        "easyfsl -tau ||x - w|| from the class means, metarun the paper's cosine",
    ),
}


@dataclass
class Episodes:
    """E episodes of embeddings: support [E, N*K, D], query [E, N*Q, D], labels in class order."""

    support: Tensor
    support_y: Tensor  # [N*K]
    query: Tensor
    query_y: Tensor  # [N*Q]
    base_mean: Tensor  # [D]

    def __len__(self) -> int:
        return self.support.shape[0]


def class_items(centres: Tensor, per_class: int, generator: torch.Generator) -> Tensor:
    """ReLU(centre + NOISE * N(0, I)), `per_class` items of each centre, class by class:
    `[C, D] -> [C*per_class, D]`."""
    noise = torch.randn(centres.shape[0], per_class, DIM, generator=generator)
    return (centres.unsqueeze(1) + NOISE * noise).relu().flatten(0, 1)


def synthetic_episodes(episodes: int, shot: int) -> Episodes:
    """The base mean, then `episodes` episodes one after another from one seeded generator."""
    generator = torch.Generator().manual_seed(SEED)
    base = class_items(torch.randn(BASE_CLASSES, DIM, generator=generator), BASE_ITEMS, generator)
    supports, queries = [], []
    for _ in range(episodes):
        centres = torch.randn(N_WAY, DIM, generator=generator)
        supports.append(class_items(centres, shot, generator))
        queries.append(class_items(centres, N_QUERY, generator))
    return Episodes(
        torch.stack(supports),
        torch.arange(N_WAY).repeat_interleave(shot),
        torch.stack(queries),
        torch.arange(N_WAY).repeat_interleave(N_QUERY),
        base.mean(dim=0),
    )


def episode_accuracy(logits: Tensor, query_y: Tensor) -> Tensor:
    """`[..., N*Q, N] -> [...]`: the share of each episode's queries classified right."""
    return (logits.argmax(dim=-1) == query_y).double().mean(dim=-1)


def metarun_head(name: str, data: Episodes) -> Head:
    head = named_head(name)
    if "mean" in head.base_statistics:
        head.set_base_statistics({"mean": data.base_mean})
    return head.eval()


def metarun_step(head: Head, data: Episodes, batch: int, stop: int | None = None) -> Tensor:
    """Episode accuracies `[E]`: the head on chunks of `batch` episodes of the first `stop`."""
    stop = len(data) if stop is None else stop
    parts = []
    for start in range(0, stop, batch):
        end = min(start + batch, stop)
        support_y = data.support_y.expand(end - start, -1)
        logits = head(data.support[start:end], support_y, data.query[start:end], N_WAY)
        parts.append(episode_accuracy(logits, data.query_y))
    return torch.cat(parts)


def easyfsl_model(name: str, shot: int) -> nn.Module:
    import easyfsl.methods

    peer = PEERS[name]
    settings = peer.settings(named_head(name), shot)
    return getattr(easyfsl.methods, peer.cls)(backbone=nn.Identity(), **settings).eval()


def easyfsl_step(model: nn.Module, data: Episodes, stop: int | None = None) -> Tensor:
    """Episode accuracies `[E]`: easyfsl's classifier one task at a time, as its examples run it."""
    stop = len(data) if stop is None else stop
    accuracies = []
    for i in range(stop):
        model.process_support_set(data.support[i], data.support_y)
        accuracies.append(episode_accuracy(model(data.query[i]), data.query_y))
    return torch.stack(accuracies)


def serve(args: argparse.Namespace) -> None:
    """A worker for one head and implementation: builds the episodes and the classifier, warms up,
    prints "ready", then answers each stdin line: "step" runs the head on all episodes and prints
    "done"; "result" prints the accuracies and peak memory as JSON."""
    name, implementation = args.serve
    if implementation == "metarun":
        keep_freed_memory()  # as metarun-eval does on the CPU before it builds anything
    if args.threads:
        torch.set_num_threads(args.threads)
    with torch.no_grad():
        answer(name, implementation, args)


def answer(name: str, implementation: str, args: argparse.Namespace) -> None:
    """`serve`'s body, under torch.no_grad()."""
    data = synthetic_episodes(args.episodes, args.shot)
    base = peak_bytes(torch.device("cpu"))
    if implementation == "metarun":
        head = metarun_head(name, data)
        step = lambda stop=None: metarun_step(head, data, args.batch, stop)
    else:
        model = easyfsl_model(name, args.shot)
        step = lambda stop=None: easyfsl_step(model, data, stop)
    step(min(WARMUP_EPISODES, len(data)))
    print("ready", flush=True)
    steps: list[Tensor] = []
    for command in sys.stdin:
        if command.strip() == "step":
            steps.append(step())
            print("done", flush=True)
        else:
            peak = peak_bytes(torch.device("cpu"))
            result = {
                "per_episode": steps[-1].tolist(),
                "rounds_agree": all(torch.equal(s, steps[-1]) for s in steps),
                "peak_growth_mib": (peak - base) / MIB,
                "peak_abs_mib": peak / MIB,
                "threads": torch.get_num_threads(),
            }
            print(json.dumps(result), flush=True)


class Worker:
    """This script in `serve` mode for one head and implementation, spoken to line by line."""

    def __init__(self, args: argparse.Namespace, head: str, implementation: str, folder: str):
        self.label = f"{head} ({implementation})"
        self.stderr = open(os.path.join(folder, f"{head}-{implementation}.stderr"), "w+")
        command = [
            sys.executable,
            os.path.abspath(__file__),
            "--serve",
            head,
            implementation,
            "--episodes",
            str(episodes_of(head, args)),
            "--shot",
            str(args.shot),
            "--batch",
            str(args.batch),
            *(["--threads", str(args.threads)] if args.threads else []),
        ]
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
                f"{self.label} failed (exit {self.process.wait()}):\n{self.stderr.read()[-3000:]}"
            )
        return answer.strip()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()
        self.stderr.close()


def episodes_of(head: str, args: argparse.Namespace) -> int:
    """The episodes one step runs for `head`: --episodes, else its default (a sixth of it with
    --quick)."""
    if args.episodes:
        return args.episodes
    default = DEFAULT_EPISODES.get(head, FULL_EPISODES)
    return max(WARMUP_EPISODES, default // QUICK_DIVISOR) if args.quick else default


def easyfsl_version() -> str | None:
    """easyfsl's version, or None where it is not installed (its rows are then left out)."""
    try:
        return importlib.metadata.version("easyfsl")
    except importlib.metadata.PackageNotFoundError:
        return None


def measure_head(head: str, args: argparse.Namespace, with_easyfsl: bool) -> dict:
    """Both implementations of `head` in workers of their own: interleaved rounds, then results."""
    implementations = ["metarun"] + (["easyfsl"] if with_easyfsl and head in PEERS else [])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        workers = {name: Worker(args, head, name, folder) for name in implementations}
        for worker in workers.values():
            worker.ask()  # "ready": built and warmed up
        steps = {name: (lambda w=worker: w.ask("step")) for name, worker in workers.items()}
        seconds = interleaved_rounds(steps, args.rounds, warmup=0)
        results = {name: json.loads(worker.ask("result")) for name, worker in workers.items()}
        for worker in workers.values():
            worker.close()
    return {
        "head": head,
        "transductive": named_head(head).transductive,
        "episodes": episodes_of(head, args),
        "seconds": seconds,
        "results": results,
        "wall_s": time.perf_counter() - started,
    }


def accuracy_text(per_episode: list[float]) -> str:
    mean, ci95 = confidence_interval(torch.tensor(per_episode))
    return f"{100 * mean:.1f} ± {100 * ci95:.1f}"


def difference_text(ours: list[float], theirs: list[float]) -> str:
    """metarun - easyfsl, paired over the episodes, in points with its 95% CI."""
    if ours == theirs:
        return "0 (same predictions)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a constant difference has no t-test
        d = paired_difference(theirs, ours)
    return f"{100 * d.mean:+.1f} ± {100 * d.ci95:.1f}"


def within_ci(ours: list[float], theirs: list[float]) -> bool:
    """Whether the paired difference's 95% CI contains 0 ("equal accuracy")."""
    if ours == theirs:
        return True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        d = paired_difference(theirs, ours)
    return abs(d.mean) <= d.ci95


def implementation_label(implementation: str, args: argparse.Namespace) -> str:
    if implementation == "metarun":
        return f"metarun, batched ({args.batch} episodes)"
    return f"easyfsl {easyfsl_version()}, per task"


def head_rows(timing: dict, args: argparse.Namespace) -> list[str]:
    """The markdown rows of one head: one per implementation."""
    seconds, results, episodes = timing["seconds"], timing["results"], timing["episodes"]
    has_peer = "easyfsl" in seconds
    rows = []
    for name, times in seconds.items():
        rate = Spread.of([episodes / s for s in times])
        mine = results[name]["per_episode"]
        if name == "metarun" and has_peer:
            ratio = ratio_text(speed_ratio(seconds, "metarun", "easyfsl"))
            difference = difference_text(mine, results["easyfsl"]["per_episode"])
        else:
            ratio, difference = "-", "-"
        flag = "" if results[name]["rounds_agree"] else " (rounds differ)"
        rows.append(
            f"| {timing['head']} | {'transductive' if timing['transductive'] else 'inductive'} "
            f"| {implementation_label(name, args)} | {episodes} | {rate_text(rate.median)} "
            f"| {rate_text(rate.low)}-{rate_text(rate.high)} | {ratio} "
            f"| {accuracy_text(mine)}{flag} | {difference} "
            f"| {results[name]['peak_growth_mib']:.0f} |"
        )
    return rows


TABLE_HEADER = (
    "| head | kind | implementation | episodes | episodes/s (median) | spread over rounds "
    "| speed metarun/easyfsl: median (min-max) | accuracy % (± 95% CI) "
    "| metarun - easyfsl (paired, points ± 95% CI) | peak RSS growth (MiB) |\n"
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
)


def notes(heads: list[str], shot: int) -> str:
    """What easyfsl ran with, per head, and where it still differs from metarun's head."""
    lines = ["Notes (easyfsl's settings and how its method differs from metarun's head):"]
    for head in heads:
        if head in PEERS:
            settings = PEERS[head].settings(named_head(head), shot)
            shown = ", ".join(f"{k}={v}" for k, v in settings.items()) or "its defaults"
            lines.append(f"- {head}: easyfsl {PEERS[head].cls}({shown}); {PEERS[head].note}")
    return "\n".join(lines)


def goal_summary(timings: list[dict]) -> str:
    """The goal, head by head: the median ratio, >= 5x or not, accuracy equal or not."""
    lines = ["Goal: metarun >= 5x faster than easyfsl at equal accuracy:"]
    for timing in timings:
        if "easyfsl" not in timing["seconds"]:
            continue
        ratio = speed_ratio(timing["seconds"], "metarun", "easyfsl")
        ours = timing["results"]["metarun"]["per_episode"]
        theirs = timing["results"]["easyfsl"]["per_episode"]
        equal = within_ci(ours, theirs)
        lines.append(
            f"- {timing['head']}: {ratio_text(ratio)} ({'>=' if ratio.median >= 5 else '<'} 5x), "
            f"accuracy {'equal within the 95% CI' if equal else 'differs beyond the 95% CI'} "
            f"({difference_text(ours, theirs)} points)"
        )
    return "\n".join(lines)


def hardware_line(threads: int) -> str:
    load = os.getloadavg()[0]
    when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return (
        f"device: {device_name(torch.device('cpu'))} | torch {torch.__version__} | threads "
        f"{threads} | easyfsl {easyfsl_version() or 'not installed'} | {when} | load average "
        f"{load:.1f} at start"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (5; 2 with --quick)")
    parser.add_argument(
        "--episodes",
        type=int,
        help=f"episodes per step for every head (default {FULL_EPISODES}, fewer for "
        f"{', '.join(f'{k} ({v})' for k, v in DEFAULT_EPISODES.items())})",
    )
    parser.add_argument("--shot", type=int, default=1, help="support items per class (1)")
    parser.add_argument(
        "--batch", type=int, default=50, help="episodes per metarun call (50, eval.batch_size)"
    )
    parser.add_argument("--heads", nargs="+", choices=head_names(), metavar="NAME")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, E / 6 episodes")
    parser.add_argument("--out", help="write the raw numbers to this JSON file")
    parser.add_argument("--serve", nargs=2, metavar=("HEAD", "IMPL"), help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.serve:  # a worker, in a process of its own
        serve(args)
        return
    args.rounds = args.rounds or (2 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    heads = args.heads or head_names()
    version = easyfsl_version()
    print(hardware_line(torch.get_num_threads()))
    print(
        f"{N_WAY}-way {args.shot}-shot, {N_QUERY} queries/class, {DIM}-wide ReLU(Gaussian) "
        f"embeddings (noise {NOISE}); {args.rounds} interleaved rounds per head after a "
        f"{WARMUP_EPISODES}-episode warm-up; each implementation in its own process"
    )
    if version is None:
        print("easyfsl is not installed (bash scripts/install_peers.sh): its rows are left out")
    report = {
        "hardware": hardware_line(torch.get_num_threads()),
        "rounds": args.rounds,
        "shot": args.shot,
        "batch": args.batch,
        "noise": NOISE,
        "heads": [],
    }
    rows: list[str] = []
    for head in heads:
        timing = measure_head(head, args, version is not None)
        rows.extend(head_rows(timing, args))
        print(f"{head}: {timing['wall_s']:.0f} s", flush=True)
        report["heads"].append(timing)
    print("\n" + TABLE_HEADER + "\n" + "\n".join(rows))
    print("\n" + notes(heads, args.shot))
    print("\n" + goal_summary(report["heads"]))
    report["total_seconds"] = time.perf_counter() - started
    print(f"\ntotal runtime {report['total_seconds']:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
