"""The meta-training loop: sample tasks, loss, step, log, validate, checkpoint; then meta-test.

`Trainer(cfg, run_dir)` builds everything and checks the config without writing a byte, so a bad
command leaves an existing run directory as it was; `run()` then trains (continuing from
`checkpoints/last.pt` when the directory holds one) and meta-tests the best checkpoint. A resumed
run whose eval.* settings change the validation episodes first re-validates `best.pt` on the new
ones, so that every later checkpoint is compared with a score from the same episodes.
One process trains a run directory at a time: a second start on a directory that a live
process trains raises `metarun.lock.RunDirBusy` before it writes anything there.

Over several processes (`metarun.distributed`) each rank trains on its share of the meta-batch and
rank 0 alone writes the run's files. On SIGTERM or a launcher's pre-timeout signal the loop stops
after the current step with `last.pt` written (`metarun.preemption`).

Faults mid-run stop it with one line and the last good checkpoints: a NaN or infinite loss,
gradient or validation score (`metarun.divergence`; nothing non-finite is logged or saved), and a
write that fails, e.g. on a full disk (`metarun.atomic.WriteFailed`). A run directory or dataset
cache that cannot be written is one line before any work (`check_places`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from torch.nn.utils import clip_grad_norm_
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from metarun.algorithms.base import MetaLearner
from metarun.atomic import WriteFailed, check_writable, write_atomically, write_errors
from metarun.checkpoint import load_checkpoint, save_checkpoint
from metarun.config import accepted_arguments, validate
from metarun.data.augment import Augment
from metarun.data.cache import default_cache_dir
from metarun.data.contract import ClassDataset, ClassImages
from metarun.data.sampler import EpisodeSampler, episode_seed, statistics
from metarun.data.tasks import TaskBatch
from metarun.device import autocast, check_amp, keep_freed_memory, resolve_device
from metarun.distributed import Processes
from metarun.divergence import (
    FP16_PATIENCE,
    Diverged,
    NonFiniteSteps,
    describe_step,
    gradient_norm,
    nonfinite_entries,
    remedies,
)
from metarun.errors import MetarunError
from metarun.evaluation import evaluate
from metarun.lock import RunDirBusy, check_run_dir_free, lock_run_dir
from metarun.models.layers import commit_running_statistics
from metarun.preemption import StopRequests
from metarun.progress import Progress
from metarun.run_log import RunLog

PARTS = ("train", "val", "test")
# Keys a resumed run may change: how long it trains, how it is evaluated, where it runs; and the
# dataset's machine-local keys (where it reads from), which the dataset declares.
RESUMABLE_CHANGES = ("train.steps", "eval.", "device.")
# The eval.* keys that change the validation episodes (which tasks, their shape, the support copies)
# and so the scores best_val compares; a resumed run that changes one re-validates best.pt. The
# others change only the test (eval.episodes) or the speed (eval.batch_size: each task is scored on
# its own); eval.episode is read through the n_way, k_shot and n_query it sets.
VALIDATION_KEYS = ("seed", "n_way", "k_shot", "n_query", "support_augment")


def build(node: DictConfig, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, with our own one-line errors unwrapped from Hydra's."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, MetarunError):
            raise cause from None
        raise MetarunError(str(e).splitlines()[0]) from e


class Trainer:
    """`parts`: the splits to draw episodes of (an evaluation of a trained run needs "test" only, so
    a dataset too small for the training episodes can still be tested on); `resume=False`: ignore a
    checkpoints/last.pt in `run_dir` (an evaluation reads a checkpoint of its choice instead)."""

    def __init__(
        self,
        cfg: DictConfig,
        run_dir: Path,
        processes: Processes = Processes(),
        parts: Sequence[str] = PARTS,
        resume: bool = True,
    ):
        validate(cfg)
        self.cfg = cfg
        self.run_dir = run_dir
        self.processes = processes
        self.tasks_per_step = processes.share(cfg.episode.meta_batch_size)  # this rank's share
        if (
            resume
        ):  # it may train here: refuse a directory another live process trains, before any work
            self.claim_run_dir(check_run_dir_free)
        self.checkpoint_dir = run_dir / "checkpoints"
        self.device = resolve_device(cfg.device.type.value)
        self.amp = cfg.device.amp.value
        check_amp(self.device, self.amp)
        if self.device.type == "cpu":
            keep_freed_memory()
        if resume:  # it trains: where it will write must be writable, before any work
            check_places(cfg, run_dir if processes.main else None)

        self.dataset = dataset = build(cfg.dataset)
        # What a task is scored by: accuracy (higher is better) or, for regression, MSE (lower is better).
        self.score = (
            "mse" if getattr(dataset, "task", "classification") == "regression" else "accuracy"
        )
        check_algorithm_learns(cfg.algorithm, dataset)
        self.augment = build(cfg.augment).resolve(dataset.standard_augment) if cfg.augment else None
        self.samplers = {part: self.episode_sampler(part) for part in parts}
        torch.manual_seed(cfg.seed)
        model = build(cfg.model)
        check_model_input(model, dataset)
        offered = {
            "model": model,
            "n_way": cfg.episode.n_way,
            "n_train_classes": dataset.n_classes("train"),
        }
        self.learner = build(cfg.algorithm, **accepted_arguments(cfg.algorithm, offered)).to(
            self.device
        )
        self.learner.check_n_way(cfg.eval.n_way)
        processes.broadcast(self.learner)  # every rank starts from rank 0's weights
        if processes.rank:
            torch.manual_seed(processes.seed(cfg.seed))  # ranks draw their own noise from here on
        self.optimizer = build(cfg.optimizer)(self.learner.parameters())
        self.scheduler = build(cfg.scheduler)(self.optimizer) if cfg.scheduler else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.generator = torch.Generator(self.device).manual_seed(processes.seed(cfg.seed))
        # NaN/inf losses and gradients stop the run; fp16's scaler skips such steps by design.
        self.nonfinite = NonFiniteSteps(FP16_PATIENCE if self.scaler.is_enabled() else 1)
        # Reading the watched values is a device sync: free on the CPU, and under fp16, whose
        # scaler syncs every step anyway; elsewhere only on the steps that sync (metarun.divergence).
        self.check_every_step = self.device.type != "cuda" or self.scaler.is_enabled()
        self.step = 0
        self.saved_step: int | None = None  # the step checkpoints/last.pt holds
        self.wall_time_s = 0.0  # of the earlier runs in this directory, when resumed
        self.started = time.perf_counter()
        self.best_val = (
            math.inf if self.score == "mse" else -math.inf
        )  # best validation score so far
        self.eval_changes: list[
            str
        ] = []  # eval.* changes since last.pt that move the validation episodes
        if resume and (self.checkpoint_dir / "last.pt").exists():
            self.load_state(load_checkpoint(self.checkpoint_dir / "last.pt", self.device))

    def episode_sampler(self, part: str) -> EpisodeSampler:
        """`part`'s episodes on the device, normalized as the dataset declares; training episodes
        augmented by the augment group, evaluation ones given eval.support_augment copies. A dataset
        of drawn tasks (sinusoid) makes its own (`dataset.sampler`)."""
        dataset, cfg = self.dataset, self.cfg
        if hasattr(dataset, "sampler"):
            return dataset.sampler(
                part, *episode_shape(cfg, part), episode_key(cfg, part), self.device
            )
        copies = 0 if part == "train" else cfg.eval.support_augment
        augment = self.support_copies_augment() if copies else self.augment
        return EpisodeSampler(
            dataset.part(part).to(self.device),
            *episode_shape(cfg, part),
            part,
            dataset.name,
            config_key=episode_key(cfg, part),
            mean=dataset.mean,
            std=dataset.std,
            augment=augment if part == "train" or copies else None,
            support_copies=copies,
        )

    def support_copies_augment(self) -> Augment:
        """What draws eval.support_augment's copies: the augment group's augmentation, or with
        augment=none the dataset's standard one."""
        return self.augment or Augment().resolve(self.dataset.standard_augment)

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Meta-train up to train.steps, then meta-test the best checkpoint; returns results.json.
        Raises metarun.preemption.Stopped when a signal stopped it (last.pt written), and
        metarun.lock.RunDirBusy, having written nothing, when another live process trains run_dir.
        A run that cannot go on raises a metarun.errors.RunFailed line, its checkpoints the last
        good ones: metarun.divergence.Diverged, or metarun.atomic.WriteFailed (a full disk).
        """
        with self.run_dir_lock(), self.write_failures_say_how_to_resume():
            self.started = time.perf_counter()
            self.log = RunLog(self.run_dir, resume_step=self.step) if self.processes.main else None
            if self.processes.main:
                self.write_config()
            self.progress = Progress(
                self.cfg.train.steps,
                self.step,
                self.cfg.train.log_every,
                enabled=self.processes.main,
            )
            try:
                if self.eval_changes:
                    self.revalidate_best()
                self.fit()
                results = self.test()
            except BaseException:
                if self.log is not None:
                    with contextlib.suppress(
                        Exception
                    ):  # the failure in flight is the one to report
                        self.log.close()
                raise
            finally:
                self.progress.close()
            if self.log is not None:
                self.log.close()  # raises a TensorBoard write that its background thread failed
        return results

    @contextlib.contextmanager
    def write_failures_say_how_to_resume(self) -> Iterator[None]:
        """A failed write (metarun.atomic.WriteFailed: it names the file and the free space) ends in
        what checkpoints/last.pt still holds and how to go on from there."""
        try:
            yield
        except WriteFailed as failed:
            if self.saved_step is None:
                fix = "free space there or choose another hydra.run.dir, and run again"
            else:
                fix = f"free space there, then the same command resumes from checkpoints/last.pt (step {self.saved_step})"
            raise failed.with_fix(fix) from failed.error

    @contextlib.contextmanager
    def run_dir_lock(self) -> Iterator[None]:
        """One process trains run_dir at a time (metarun.lock): rank 0 holds the lock for all ranks."""
        lock = self.claim_run_dir(lock_run_dir)
        try:
            yield
        finally:
            if lock is not None:
                lock.release()

    def claim_run_dir(self, take: Callable[[Path], Any]) -> Any:
        """`take(run_dir)` on rank 0 (the ranks share rank 0's directory, and rank 0 alone writes
        there); its RunDirBusy raised on every rank, so that none waits for a rank that left."""
        taken, busy = None, None
        if self.processes.main:
            try:
                taken = take(self.run_dir)
            except RunDirBusy as e:
                busy = str(e)
        busy = self.processes.agree(busy)
        if busy is not None:
            raise RunDirBusy(busy)
        return taken

    def fit(self) -> None:
        train = self.cfg.train
        self.learner.train()
        tic, tic_step = time.perf_counter(), self.step
        with StopRequests() as stop:
            while self.step < train.steps:
                tasks = self.samplers["train"].sample(self.tasks_per_step, self.generator)
                logging = (self.step + 1) % train.log_every == 0 or self.step + 1 == train.steps
                metrics = self.train_step(tasks, diagnostics=logging)
                self.step += 1
                checkpointed = self.step % train.val_every == 0 or self.step == train.steps
                if logging or checkpointed or self.check_every_step:
                    self.stop_if_diverged()  # before the step's numbers are logged or its weights saved
                shown = None
                if logging:
                    # The whole meta-batch's numbers, not rank 0's share: one all-reduce.
                    metrics = self.processes.mean_over_tasks(metrics, self.tasks_per_step)
                    values = {name: value.item() for name, value in metrics.items()}
                    values["lr"] = self.optimizer.param_groups[0]["lr"]
                    values["tasks_per_s"] = (
                        (self.step - tic_step)
                        * self.cfg.episode.meta_batch_size
                        / (time.perf_counter() - tic)
                    )  # all ranks together
                    tic, tic_step = time.perf_counter(), self.step
                    self.record("train", values)
                    shown = {
                        "loss": values["loss"],
                        self.score[:3]: values[self.score],
                        "tasks/s": values["tasks_per_s"],
                    }
                self.progress.update(self.step, shown)
                if checkpointed:
                    self.validate_and_checkpoint()
                    tic, tic_step = time.perf_counter(), self.step
                if self.processes.any(
                    stop.requested is not None, self.device
                ):  # every rank stops at this step
                    if not checkpointed:
                        self.save_last()
                    self.progress.write(
                        f"step {self.step}: stopping on a signal; checkpoints/last.pt holds this step"
                    )
                    stop.hand_over(self.step)

    def train_step(self, tasks, diagnostics: bool = False) -> dict[str, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        # Gradient-based learners scale their inner-loop losses by this too (fp16 only).
        loss_scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        metrics = meta_backward(
            self.learner,
            tasks,
            diagnostics=diagnostics,
            loss_scale=loss_scale,
            scale=self.scaler.scale,
            autocast=lambda: autocast(self.device, self.amp),
        )
        self.processes.average_gradients(
            self.learner.parameters()
        )  # where the ranks' gradients meet
        self.scaler.unscale_(
            self.optimizer
        )  # clip and watch the true gradient, not the fp16-scaled one
        if self.cfg.train.grad_clip is not None:
            # The norm before clipping, logged with the step's metrics.
            metrics["grad_norm"] = grad_norm = clip_grad_norm_(
                self.learner.parameters(), self.cfg.train.grad_clip
            )
        else:
            grad_norm = gradient_norm(self.learner.parameters())
        self.nonfinite.observe(self.step + 1, metrics["loss"], grad_norm)  # on the device: no sync
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        self.processes.broadcast(
            self.learner, buffers_only=True
        )  # running statistics follow rank 0's
        return metrics

    def validate_and_checkpoint(self) -> None:
        val = self.evaluate("val", self.cfg.train.val_episodes)
        self.check_validation(val, f"step {self.step}")  # a NaN score is never the best
        score = val[self.score]
        improved = score < self.best_val if self.score == "mse" else score > self.best_val
        if improved:
            self.best_val = score
            self.check_weights()
            if self.processes.main:
                save_checkpoint(
                    {
                        "learner": self.learner.state_dict(),
                        "step": self.step,
                        "val": val,
                        "normalization": statistics(self.dataset),
                    },
                    self.checkpoint_dir / "best.pt",
                )
        self.record("val", {"loss": val["loss"], self.score: score})
        self.save_last()
        self.progress.write(
            f"step {self.step}: val {describe_score(self.score, val)}"
            + ("  (best)" if improved else "")
        )

    def revalidate_best(self) -> None:
        """Score best.pt on this run's validation episodes: best_val was measured on the episodes of
        the eval.* settings this run changed, and later steps must be compared on the same ones."""
        best = self.checkpoint_dir / "best.pt"
        if not best.exists():  # no validation has scored yet: nothing to compare with
            self.best_val = math.inf if self.score == "mse" else -math.inf
            return
        state = load_checkpoint(best, self.device)
        resumed = {name: value.clone() for name, value in self.learner.state_dict().items()}
        self.learner.load_state_dict(state["learner"])
        val = self.evaluate("val", self.cfg.train.val_episodes)
        self.learner.load_state_dict(resumed)
        self.check_validation(val, f"best.pt (step {state['step']}) on the new validation episodes")
        old, self.best_val = self.best_val, val[self.score]
        if self.processes.main:
            save_checkpoint(
                {**state, "val": val}, best
            )  # its record now holds the score best_val compares
        was = f"{100 * old:.1f}%" if self.score == "accuracy" else f"{old:.4f}"
        self.progress.write(
            f"{', '.join(self.eval_changes)} since the last start: best.pt (step {state['step']}) "
            f"re-validated on the new validation episodes, val {describe_score(self.score, val)} "
            f"(best_val was {was} on the old ones)"
        )

    def save_last(self) -> None:
        self.stop_if_diverged()
        self.check_weights()
        state = self.state()  # every rank takes part: it gathers their generators
        if self.processes.main:
            save_checkpoint(state, self.checkpoint_dir / "last.pt")
        self.saved_step = self.step

    # -- divergence (metarun.divergence): nothing non-finite is logged, saved or made the best ---
    def stop_if_diverged(self) -> None:
        """Raise Diverged if the steps since the last check hold a run of non-finite losses or
        gradient norms (one sync); every rank raises together."""
        found = self.nonfinite.check()
        if not self.processes.any(found is not None, self.device):
            return
        if found is None:
            raise self.diverged(
                f"by step {self.step} another process's loss or gradient became NaN or infinite"
            )
        raise self.diverged(describe_step(found, fp16=self.scaler.is_enabled()))

    def check_weights(self) -> None:
        """The learner's weights and buffers are finite, as every checkpoint must hold them (the
        ranks hold the same ones, so they agree)."""
        bad = nonfinite_entries(self.learner.state_dict())
        if bad:
            raise self.diverged(
                f"after step {self.step} the learner's {bad[0]} holds NaN or infinite values"
            )

    def check_validation(self, val: dict[str, Any], what: str) -> None:
        score, loss = val[self.score], val["loss"]
        if not (math.isfinite(score) and math.isfinite(loss)):
            raise self.diverged(f"{what}: validation {self.score} {score:g}, loss {loss:g}")

    def diverged(self, what: str) -> Diverged:
        kept = (
            "no checkpoint was written"
            if self.saved_step is None
            else f"checkpoints/last.pt keeps step {self.saved_step}, its last finite weights"
        )
        lr = self.optimizer.param_groups[0]["lr"]
        return Diverged(
            f"{what}; the run diverged: {remedies(self.cfg, lr)}, in a new hydra.run.dir ({kept})"
        )

    def record(self, split: str, values: dict[str, float]) -> None:
        if self.log is not None:
            self.log.scalars(split, self.step, values)

    def evaluate(self, part: str, episodes: int) -> dict[str, Any]:
        cfg = self.cfg.eval
        return evaluate(
            self.learner,
            self.samplers[part],
            episodes,
            cfg.seed,
            cfg.batch_size,
            autocast(self.device, self.amp),
            score=self.score,
            processes=self.processes,
        )

    def test(self) -> dict[str, Any]:
        best = self.checkpoint_dir / "best.pt"
        self.processes.barrier()  # rank 0 has written best.pt
        if best.exists():
            self.learner.load_state_dict(load_checkpoint(best, self.device)["learner"])
        test = self.evaluate("test", self.cfg.eval.episodes)
        score = self.score
        results = {
            **test_results(test, score, self.cfg),
            f"best_val_{score}": self.best_val,
            "steps": self.step,
            "wall_time_s": self.elapsed(),
            "processes": self.processes.world_size,
            "config": config_container(self.cfg),
        }
        if not self.processes.main:
            return results
        self.write_test(self.run_dir, results, test)
        self.record("test", {"loss": test["loss"], score: test[score]})
        self.log.hparams(
            hparams(self.cfg),
            {f"hparam/test_{score}": test[score], f"hparam/best_val_{score}": self.best_val},
        )
        print(
            f"test {describe_score(score, test)} ({test['episodes']} episodes, batch_norm={results['batch_norm']})"
        )
        if hasattr(self.dataset, "figures"):  # e.g. sinusoid: adaptation.png beside results.json
            self.dataset.figures(self.learner, self.samplers["test"], self.run_dir)
        return results

    def write_test(self, directory: Path, results: dict[str, Any], test: dict[str, Any]) -> None:
        """results.json, and test_episodes.json: each test episode's score. Runs with the same
        identity met the same episodes, so a report can compare them episode by episode."""
        write_json(directory / "results.json", results)
        write_json(
            directory / "test_episodes.json",
            {"score": self.score, "identity": self.test_identity(), "values": test["per_episode"]},
        )

    def test_identity(self) -> dict[str, Any]:
        """What fixes the test episodes: the dataset and its split, the episodes' shape, count and seed,
        and a class dataset's test images by content. The machine-local keys (where the data lies)
        are left out and the content stands in for them: a moved copy of the same images still
        pairs, other images under the same settings (a `folder`'s `path`) never do."""
        dataset = {
            k: v
            for k, v in config_container(self.cfg.dataset).items()
            if k not in self.dataset.machine_local
        }
        n_way, k_shot, n_query = episode_shape(self.cfg, "test")
        identity = {
            "dataset": dataset,
            "split": "test",
            "n_way": n_way,
            "k_shot": k_shot,
            "n_query": n_query,
            "episodes": self.cfg.eval.episodes,
            "seed": self.cfg.eval.seed,
            "support_augment": self.cfg.eval.support_augment,
        }
        if not hasattr(
            self.dataset, "sampler"
        ):  # a dataset of drawn tasks (sinusoid) is its config alone
            identity["test_images"] = content_fingerprint(self.dataset.part("test"))
        return identity

    def elapsed(self) -> float:
        """Seconds this run has trained and tested, over all its starts in this directory."""
        return self.wall_time_s + time.perf_counter() - self.started

    # -- state ----------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything a resumed run needs; on several processes every rank must call it together."""
        ranks = self.processes.gather(
            {
                "train_sampler": self.generator.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            }
        )
        return {
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "best_val": self.best_val,
            "wall_time_s": self.elapsed(),
            # Each rank's generators: rank 0's under "rng", all of them under "rng_per_rank".
            "rng": ranks[0],
            **({"rng_per_rank": ranks} if self.processes.several else {}),
            "world_size": self.processes.world_size,
            "device": self.device.type,  # the generators' states above are of this device type
            "normalization": statistics(
                self.dataset
            ),  # what the model learned on (metarun.saved_run)
            "config": config_container(self.cfg),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        path = self.checkpoint_dir / "last.pt"
        machine_local = tuple(f"dataset.{key}" for key in self.dataset.machine_local)
        changed = config_changes(state.get("config", {}), config_container(self.cfg), machine_local)
        if changed:
            raise MetarunError(
                f"{self.run_dir} holds a run with a different config ({changed[0]}); "
                "resume with the same overrides or choose a new hydra.run.dir"
            )
        self.eval_changes = validation_changes(state.get("config", {}), config_container(self.cfg))
        saved = state.get("world_size", 1)
        if saved != self.processes.world_size:
            raise MetarunError(
                f"{path} was written by {saved} processes and this run has {self.processes.world_size}; "
                f"resume with as many (torchrun --nproc_per_node={saved}) or choose a new hydra.run.dir"
            )
        try:
            self.learner.load_state_dict(state["learner"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.step = self.saved_step = state["step"]
            self.best_val = (
                state["best_val"] if "best_val" in state else state["best_val_accuracy"]
            )  # older runs
            self.wall_time_s = state.get("wall_time_s", 0.0)
            rng = (
                state["rng_per_rank"][self.processes.rank]
                if self.processes.several
                else state["rng"]
            )
            self.resume_generator(state.get("device", self.device.type), rng["train_sampler"], path)
            torch.set_rng_state(rng["torch"].cpu())
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise MetarunError(
                f"{path} does not match this run ({type(e).__name__}); delete it to start over or choose a new hydra.run.dir"
            ) from e

    def resume_generator(self, saved_device: str, saved_state: torch.Tensor, path: Path) -> None:
        """The task generator where last.pt left it; written on another device type, whose generator
        state this one cannot take (CPU and CUDA generators differ), restarted from a seed of
        (seed, step) instead, with one warning: the resumed tasks then differ from an uninterrupted run's."""
        if saved_device == self.device.type:
            self.generator.set_state(saved_state.cpu())
            return
        self.generator.manual_seed(episode_seed(self.processes.seed(self.cfg.seed), self.step))
        warnings.warn(
            f"{path} was written on {saved_device} and this run resumes on {self.device.type}, whose task "
            f"generator cannot take its state: it restarts from a seed of (seed, step {self.step}), so the "
            f"tasks from step {self.step} on differ from those of an uninterrupted run",
            stacklevel=3,
        )

    def write_config(self) -> None:
        """The record Hydra would write to .hydra/, written only once the run can really start."""
        from hydra.core.hydra_config import HydraConfig

        record = self.run_dir / ".hydra"
        with write_errors(record):
            record.mkdir(parents=True, exist_ok=True)
            OmegaConf.save(self.cfg, record / "config.yaml")
            if HydraConfig.initialized():
                hydra_cfg = HydraConfig.get()
                OmegaConf.save(hydra_cfg, record / "hydra.yaml")
                OmegaConf.save(
                    OmegaConf.create(list(hydra_cfg.overrides.task)), record / "overrides.yaml"
                )


def meta_backward(
    learner: MetaLearner,
    tasks: TaskBatch,
    *,
    diagnostics: bool = False,
    loss_scale: float = 1.0,
    scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
) -> dict[str, torch.Tensor]:
    """Accumulate the meta-gradient of `tasks` into the learner's `.grad`; returns the metrics.

    The learner may split the meta-batch (`task_chunks`): each chunk's loss, weighted by its share
    of the tasks, is backpropagated (through `scale`, e.g. a GradScaler's) before the next chunk's
    graph is built, so the gradients sum to the whole batch's meta-gradient while memory holds one
    chunk's graph. The metrics, means over tasks, are weighted the same way.
    """
    metrics: dict[str, torch.Tensor] = {}
    for chunk in learner.task_chunks(tasks):
        share = len(chunk) / len(tasks)
        with autocast():
            loss, chunk_metrics = learner(chunk, diagnostics=diagnostics, loss_scale=loss_scale)
        scale(loss * share).backward()
        for name, value in chunk_metrics.items():
            metrics[name] = metrics.get(name, 0.0) + share * value
    commit_running_statistics(
        learner
    )  # one update per meta-batch, whatever the chunks (metarun.models.layers)
    return metrics


def test_results(test: dict[str, Any], score: str, cfg: DictConfig) -> dict[str, Any]:
    """A test's entries in results.json: the score, its CI, the episodes, the loss, and the batch
    norm that produced them (transductive "task", inductive "running", or "none" for an MLP)."""
    return {
        f"test_{score}": test[score],
        "ci95": test["ci95"],
        "episodes": test["episodes"],
        "test_loss": test["loss"],
        "batch_norm": OmegaConf.select(cfg, "model.batch_norm", default="none"),
    }


def content_fingerprint(part: ClassImages) -> dict[str, Any]:
    """A part's images by content: its class and image counts, and a SHA-256 of the class names, the
    images per class and every pixel (about 1.5 GB/s: a fifth of a second for mini-ImageNet's test part)."""
    digest = hashlib.sha256(
        json.dumps([list(part.names), part.counts.tolist(), list(part.image_shape)]).encode()
    )
    digest.update(memoryview(part.images.cpu().contiguous().numpy()).cast("B"))
    return {"classes": part.n_classes, "images": len(part.images), "sha256": digest.hexdigest()}


def write_json(path: Path, record: dict[str, Any]) -> None:
    write_atomically(path, lambda f: f.write(json.dumps(record, indent=2).encode() + b"\n"))


def check_places(cfg: DictConfig, run_dir: Path | None) -> None:
    """A run directory, and a dataset cache, that cannot be written are one line before any work
    (a probe file each, removed again), not a failed write hours into the run. A cache folder that
    already holds files is only read when they are current, so one shared read-only passes."""
    if run_dir is not None:
        check_writable(run_dir, "choose another hydra.run.dir")
    if "cache_dir" in cfg.dataset:
        cache = Path(cfg.dataset.cache_dir or default_cache_dir()).expanduser()
        if not (cache.is_dir() and any(cache.iterdir())):
            check_writable(
                cache, "set dataset.cache_dir (or METARUN_CACHE) to a folder you can write"
            )


def check_model_input(model: torch.nn.Module, dataset: ClassDataset) -> None:
    """A backbone that declares its input (in_shape) must take the dataset's items."""
    have, wanted = getattr(model, "in_shape", None), tuple(dataset.input_shape)
    if have is None or tuple(have) == wanted:
        return
    if len(have) != len(wanted):
        fits = "model=mlp" if len(wanted) == 1 else "model=conv4, resnet12 or resnet18"
        raise MetarunError(
            f"{type(model).__name__} takes inputs of shape {tuple(have)} but {dataset.name}'s items "
            f"have shape {wanted}; use a backbone for them: {fits}"
        )
    for key, source, index in (("in_channels", "channels", 0), ("image_size", "image_size", -1)):
        if have[index] != wanted[index]:
            raise MetarunError(
                f"model.{key}={have[index]} but {dataset.name}'s images have {source}={wanted[index]}; "
                f"set model.{key}=${{dataset.{source}}} (the default) or dataset.{source}={have[index]}"
            )


def check_algorithm_learns(node: DictConfig, dataset: Any) -> None:
    """A regression dataset needs a learner that learns regression (a one-line error otherwise)."""
    if (
        getattr(dataset, "task", "classification") == "regression"
        and not get_object(node._target_).regression
    ):
        raise MetarunError(
            f"{node._target_.rsplit('.', 1)[-1]} classifies and cannot learn {dataset.name}'s "
            "regression tasks; use algorithm=maml, fomaml, metasgd, anil or reptile"
        )


def describe_score(score: str, result: dict[str, float]) -> str:
    """'acc 97.1% +- 0.3' or 'mse 0.123 +- 0.010': a validation or test result for the log line."""
    if score == "accuracy":
        return f"acc {100 * result['accuracy']:.1f}% +- {100 * result['ci95']:.1f}"
    return f"mse {result['mse']:.4f} +- {result['ci95']:.4f}"


def episode_key(cfg: DictConfig, part: str) -> str:
    """The config node that sets `part`'s episodes: eval.* once it differs from episode.*."""
    differs = any(cfg.eval[key] != cfg.episode[key] for key in ("n_way", "k_shot", "n_query"))
    return "eval" if part != "train" and differs else "episode"


def episode_shape(cfg: DictConfig, part: str) -> tuple[int, int, int]:
    """(n_way, k_shot, n_query) of `part`'s episodes."""
    node = cfg[episode_key(cfg, part)]
    return node.n_way, node.k_shot, node.n_query


def config_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(
    old: dict[str, Any], new: dict[str, Any], also_allowed: tuple[str, ...] = ()
) -> list[str]:
    """Keys whose values differ between two configs, except those a resumed run may change."""
    old, new = flatten(old), flatten(new)
    allowed = RESUMABLE_CHANGES + also_allowed
    return [
        f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key) and not key.startswith(allowed)
    ]


def validation_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The VALIDATION_KEYS whose values differ between two configs, as "eval.KEY: OLD -> NEW"."""
    old_eval, new_eval = old.get("eval", {}), new.get("eval", {})
    return [
        f"eval.{key}: {old_eval.get(key)!r} -> {new_eval.get(key)!r}"
        for key in VALIDATION_KEYS
        if old_eval.get(key) != new_eval.get(key)
    ]


def hparams(cfg: DictConfig) -> dict[str, Any]:
    """The run's hyperparameters as TensorBoard wants them: flat, scalar values only."""
    flat = flatten(config_container(cfg))
    return {
        k: v
        for k, v in flat.items()
        if isinstance(v, (int, float, str, bool))
        and not k.startswith(("dataset.root", "dataset.path"))
    }
