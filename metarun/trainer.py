"""The meta-training loop: sample tasks, loss, step, log, validate, checkpoint; then meta-test.

`Trainer(cfg, run_dir)` checks the command, claims the run directory and builds the experiment
(metarun.experiment) and what only training needs (optimizer, scheduler, gradient scaler, the task
generator) without writing a byte, so a bad command leaves an existing run directory as it was.
`run()` then trains (continuing from checkpoints/last.pt when the directory holds one) and
meta-tests the best checkpoint; with eval.ensemble_top_k=K > 1 it keeps the K best validations'
checkpoints (checkpoints/top-step<N>.pt, listed with their scores in last.pt) and meta-tests them
together, averaging each query's class probabilities over the K models (MAML++). A resumed run
whose eval.* settings change the validation episodes first re-validates best.pt (and those K) on
the new ones, so that every later checkpoint is compared with a score from the same episodes. One
process trains a run directory at a time: a second start on a directory that a live process trains
raises `metarun.lock.RunDirBusy` before it writes anything.

Over several processes (`metarun.distributed`) each rank trains on its share of the meta-batch and
rank 0 alone writes the run's files. On SIGTERM or a launcher's pre-timeout signal the loop stops
after the current step with last.pt written (`metarun.preemption`).

Faults mid-run stop it with one line and the last good checkpoints: a NaN or infinite loss,
gradient or validation score (`metarun.divergence`; nothing non-finite is logged or saved), and a
write that fails, e.g. on a full disk (`metarun.atomic.WriteFailed`). A run directory or dataset
cache that cannot be written is one line before any work (`check_places`).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional, Union

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.utils import clip_grad_norm_

from metarun import run_dir as files
from metarun.algorithms.base import MetaLearner
from metarun.atomic import WriteFailed, check_writable
from metarun.checkpoint import load_checkpoint, save_checkpoint
from metarun.config import (
    build,
    config_changes,
    config_container,
    validate,
    validation_changes,
)
from metarun.data.batches import ImageBatch, ImageBatches
from metarun.data.cache import default_cache_dir
from metarun.data.contract import TaskDataset
from metarun.data.sampler import episode_seed, statistics
from metarun.data.tasks import TaskBatch
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
from metarun.evaluation import check_ensemble, ensemble_evaluate
from metarun.experiment import Experiment
from metarun.lock import check_run_dir_free, claim_on_rank0, training_lock
from metarun.loggers.named import build_loggers, run_info
from metarun.models.layers import commit_running_statistics
from metarun.preemption import Stopped, StopRequests
from metarun.progress import Progress
from metarun.run_log import RunLog
from metarun.source_run import init_backbone, open_source, source_learner
from metarun.task_workers import in_order, threads_for, training_pays
from metarun.top_checkpoints import TopCheckpoints


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path, processes: Processes = Processes()):
        validate(cfg)
        self.tasks_per_step = processes.share(cfg.episode.meta_batch_size)  # this rank's share
        # Before any work: a directory another live process trains, or one that cannot be written.
        claim_on_rank0(run_dir, processes, check_run_dir_free)
        check_places(cfg, run_dir if processes.main else None)
        self.experiment = experiment = Experiment(cfg)
        self.cfg, self.run_dir, self.processes = cfg, run_dir, processes
        self.device, self.dataset, self.score = (
            experiment.device,
            experiment.dataset,
            experiment.score,
        )
        self.samplers, self.learner = experiment.samplers, experiment.learner
        self.check_ensemble()
        # The loggers of cfg.logger, checked now: a missing package or a server that does not answer
        # is one line before anything is written, never a failure in the middle of the run.
        self.loggers = build_loggers(cfg) if processes.main else []
        train_batches = self.samplers["train"]
        if isinstance(train_batches, ImageBatches):  # each rank takes its slice of every batch
            train_batches.rank, train_batches.world_size = processes.rank, processes.world_size
        # Steps per epoch of the training images (None: episodes); with train.epochs the length,
        # the validation interval and the scheduler count epochs.
        self.epoch_steps = getattr(train_batches, "steps_per_epoch", None)
        per_epoch = self.epoch_steps if cfg.train.epochs is not None else None
        self.unit = per_epoch or 1  # steps per unit of train.val_every and of the scheduler
        self.steps = cfg.train.epochs * per_epoch if per_epoch else cfg.train.steps
        self.init: Optional[dict[str, Any]] = None  # where model.init's backbone came from
        self.attach_teacher()
        if processes.rank:
            torch.manual_seed(processes.seed(cfg.seed))  # ranks draw their own noise from here on
        self.optimizer = build(cfg.optimizer)(parameter_groups(self.learner, cfg.optimizer.lr))
        self.scheduler = build(cfg.scheduler)(self.optimizer) if cfg.scheduler else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=experiment.amp == "fp16")
        self.generator = torch.Generator(self.device).manual_seed(processes.seed(cfg.seed))
        # NaN/inf losses and gradients stop the run; fp16's scaler skips such steps by design.
        self.nonfinite = NonFiniteSteps(FP16_PATIENCE if self.scaler.is_enabled() else 1)
        # Reading the watched values is a device sync: free on the CPU, and under fp16, whose
        # scaler syncs every step anyway; elsewhere only on the steps that sync (metarun.divergence).
        self.check_every_step = self.device.type != "cuda" or self.scaler.is_enabled()
        self.step = 0
        self.saved_step: Optional[int] = None  # the step checkpoints/last.pt holds
        self.wall_time_s = 0.0  # of the earlier runs in this directory, when resumed
        self.started = time.perf_counter()
        self.best_val = self.score.worst  # the best validation score so far
        # eval.ensemble_top_k's members: the best validations so far and their checkpoints.
        self.top = TopCheckpoints(run_dir, cfg.eval.ensemble_top_k, self.score, processes.main)
        self.eval_changes: list[str] = []  # eval.* changes since last.pt that move validation
        # fit() and test() alone log nothing; run() gives them the run's log and progress bar.
        self.log: Optional[RunLog] = None
        self.progress = Progress(self.steps, 0, cfg.train.log_every, enabled=False)
        last = files.checkpoint_file(run_dir, "last")
        if last.exists():
            self.load_state(load_checkpoint(last, self.device))
        elif OmegaConf.select(cfg, "model.init"):
            source = open_source(cfg.model.init, "model.init", self.device)
            init_backbone(self.learner, source)
            self.init = source.entry()
        processes.broadcast(self.learner)  # every rank starts from rank 0's weights

    def check_ensemble(self) -> None:
        """eval.ensemble_top_k > 1 needs per-query class probabilities (metarun.evaluation) and the
        best validations to test, not the last checkpoint."""
        top_k = self.cfg.eval.ensemble_top_k
        check_ensemble(top_k, self.experiment.tester, self.score, self.dataset.name)
        if top_k > 1 and self.cfg.train.test_checkpoint.value != "best":
            raise MetarunError(
                f"eval.ensemble_top_k={top_k} tests the {top_k} best validation checkpoints "
                "together, and train.test_checkpoint=last asks for the last one; set "
                "eval.ensemble_top_k=1 or train.test_checkpoint=best"
            )

    def attach_teacher(self) -> None:
        """The teacher that algorithm.teacher names (self-distillation), loaded and frozen."""
        teacher = getattr(self.learner, "teacher", None)
        if teacher:
            source = open_source(teacher, "algorithm.teacher", self.device)
            self.learner.attach_teacher(source_learner(source, self.device))

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Meta-train up to train.steps, then meta-test the best checkpoint; returns results.json.
        Raises metarun.preemption.Stopped when a signal stopped it (last.pt written), and
        metarun.lock.RunDirBusy, having written nothing, when another live process trains run_dir.
        A run that cannot go on raises a metarun.errors.RunFailed line, its checkpoints the last
        good ones: metarun.divergence.Diverged, or metarun.atomic.WriteFailed (a full disk).
        """
        main = self.processes.main
        with training_lock(self.run_dir, self.processes), self.write_failures_say_how_to_resume():
            self.started = time.perf_counter()
            if main:
                remote = any(logger.remote for logger in self.loggers)
                info = run_info(self.cfg, self.run_dir, with_commit=remote)
                self.log = RunLog(self.run_dir, self.step, self.loggers, info)
                files.write_config(self.run_dir, self.cfg)
            train = self.cfg.train
            self.progress = Progress(self.steps, self.step, train.log_every, enabled=main)
            try:
                if self.eval_changes:
                    self.revalidate_best()
                    self.revalidate_top_k()
                self.top.remove_unlisted()  # a member written after last.pt by a killed start
                self.fit()
                results = self.test()
            except BaseException as e:
                if self.log is not None:
                    stopped = isinstance(e, (Stopped, KeyboardInterrupt))
                    with contextlib.suppress(
                        Exception
                    ):  # the failure in flight is the one to report
                        self.log.close("stopped" if stopped else "failed")
                raise
            finally:
                self.progress.close()
            if self.log is not None:
                self.log.close()  # raises a TensorBoard write that its background thread failed
        return results

    def fit(self) -> None:
        train = self.cfg.train
        self.learner.train()
        tic, tic_step = time.perf_counter(), self.step
        rate, per_step = self.throughput()
        with StopRequests() as stop:
            while self.step < self.steps:
                tasks = self.training_batch()
                logging = (self.step + 1) % train.log_every == 0 or self.step + 1 == self.steps
                metrics = self.train_step(tasks, diagnostics=logging)
                self.step += 1
                if self.scheduler is not None and self.step % self.unit == 0:
                    self.scheduler.step()
                validating = self.step % (train.val_every * self.unit) == 0
                checkpointed = validating or self.step == self.steps
                if logging or checkpointed or self.check_every_step:
                    self.stop_if_diverged()  # before the step's numbers are logged or saved
                shown = None
                if logging:
                    # The whole meta-batch's numbers, not rank 0's share: one all-reduce.
                    metrics = self.processes.mean_over_tasks(metrics, self.tasks_per_step)
                    values = {name: value.item() for name, value in metrics.items()}
                    values["lr"] = self.optimizer.param_groups[0]["lr"]
                    if self.epoch_steps:
                        values["epoch"] = self.step / self.epoch_steps
                    done = (self.step - tic_step) * per_step
                    values[f"{rate}_per_s"] = done / (time.perf_counter() - tic)  # all ranks
                    tic, tic_step = time.perf_counter(), self.step
                    self.record("train", values)
                    score = self.score
                    shown = {
                        "loss": values["loss"],
                        score.short: values[score.name],
                        f"{rate}/s": values[f"{rate}_per_s"],
                    }
                self.progress.update(self.step, shown)
                if checkpointed:
                    self.validate_and_checkpoint()
                    tic, tic_step = time.perf_counter(), self.step
                if self.processes.any(stop.requested is not None, self.device):  # all ranks stop
                    if not checkpointed:
                        self.save_last()
                    self.progress.write(
                        f"step {self.step}: stopping on a signal; checkpoints/last.pt holds this step"
                    )
                    stop.hand_over(self.step)

    def training_batch(self) -> Union[TaskBatch, ImageBatch]:
        """This step's training tasks, or its batch of images (a function of the step alone)."""
        sampler = self.samplers["train"]
        if isinstance(sampler, ImageBatches):
            return sampler.batch(self.step, self.generator)
        return sampler.sample(self.tasks_per_step, self.generator)

    def throughput(self) -> tuple[str, int]:
        """What a step trains on, as the log's rate names it, and how many per step (all ranks)."""
        if isinstance(self.samplers["train"], ImageBatches):
            return "images", self.cfg.train.batch_size
        return "tasks", self.cfg.episode.meta_batch_size

    def train_step(
        self, tasks: Union[TaskBatch, ImageBatch], diagnostics: bool = False
    ) -> dict[str, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        self.learner.set_progress(self.step)
        # Gradient-based learners scale their inner-loop losses by this too (fp16 only).
        loss_scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        metrics = meta_backward(
            self.learner,
            tasks,
            diagnostics=diagnostics,
            loss_scale=loss_scale,
            scale=self.scaler.scale,
            autocast=self.experiment.autocast,
        )
        parameters = self.learner.parameters
        self.processes.average_gradients(parameters())  # where the ranks' gradients meet
        self.scaler.unscale_(self.optimizer)  # clip and watch the true gradient, not fp16's scaled
        if self.cfg.train.grad_clip is not None:
            # The norm before clipping, logged with the step's metrics.
            grad_norm = clip_grad_norm_(parameters(), self.cfg.train.grad_clip)
            metrics["grad_norm"] = grad_norm
        else:
            grad_norm = gradient_norm(parameters())
        self.nonfinite.observe(self.step + 1, metrics["loss"], grad_norm)  # on the device: no sync
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.processes.broadcast(self.learner, buffers_only=True)  # running stats follow rank 0's
        return metrics

    def validate_and_checkpoint(self) -> None:
        val = self.evaluate("val", self.cfg.train.val_episodes)
        self.check_validation(val, f"step {self.step}")  # a NaN score is never the best
        score = val[self.score.name]
        improved = self.score.better(score, than=self.best_val)
        if improved:
            self.best_val = score
            self.check_weights()
            if self.processes.main:
                best = self.checkpoint_of(val)
                save_checkpoint(best, files.checkpoint_file(self.run_dir, "best"))
        self.top.enter(self.step, score, lambda: self.checkpoint_of(val))
        self.record("val", {"loss": val["loss"], self.score.name: score})
        self.save_last()
        self.top.remove_unlisted()  # last.pt lists the new members: the old ones can go
        best = "  (best)" if improved else ""
        self.progress.write(f"step {self.step}: val {self.score.describe(val)}{best}")

    def revalidate_best(self) -> None:
        """Score best.pt on this run's validation episodes: best_val was measured on the episodes of
        the eval.* settings this run changed, and later steps must be compared on the same ones."""
        best = files.checkpoint_file(self.run_dir, "best")
        if not best.exists():  # no validation has scored yet: nothing to compare with
            self.best_val = self.score.worst
            return
        state = load_checkpoint(best, self.device)
        resumed = {name: value.clone() for name, value in self.learner.state_dict().items()}
        self.learner.load_state_dict(state["learner"])
        val = self.evaluate("val", self.cfg.train.val_episodes)
        self.learner.load_state_dict(resumed)
        self.check_validation(val, f"best.pt (step {state['step']}) on the new validation episodes")
        old, self.best_val = self.best_val, val[self.score.name]
        if self.processes.main:
            save_checkpoint({**state, "val": val}, best)  # its record holds what best_val compares
        self.progress.write(
            f"{', '.join(self.eval_changes)} since the last start: best.pt (step {state['step']}) "
            f"re-validated on the new validation episodes, val {self.score.describe(val)} "
            f"(best_val was {self.score.value(old)} on the old ones)"
        )

    def revalidate_top_k(self) -> None:
        """Score eval.ensemble_top_k's members on this run's validation episodes (as
        revalidate_best does best.pt) and rank them again."""
        if not self.top.members:
            return
        resumed = {name: value.clone() for name, value in self.learner.state_dict().items()}

        def validate(path: Path) -> dict[str, Any]:
            state = load_checkpoint(path, self.device)
            self.learner.load_state_dict(state["learner"])
            val = self.evaluate("val", self.cfg.train.val_episodes)
            self.check_validation(val, f"{path.name} on the new validation episodes")
            if self.processes.main:
                save_checkpoint({**state, "val": val}, path)
            return val

        self.top.rescore(validate)
        self.learner.load_state_dict(resumed)
        self.progress.write(
            f"the {len(self.top.members)} checkpoints of eval.ensemble_top_k re-validated on the "
            "new validation episodes"
        )

    def checkpoint_of(self, val: dict[str, Any]) -> dict[str, Any]:
        """best.pt's and an ensemble member's record: the weights at this validation."""
        return {
            "learner": self.learner.state_dict(),
            "step": self.step,
            "val": val,
            "normalization": self.normalization(),
        }

    def save_last(self) -> None:
        self.stop_if_diverged()
        self.check_weights()
        state = self.state()  # every rank takes part: it gathers their generators
        if self.processes.main:
            save_checkpoint(state, files.checkpoint_file(self.run_dir, "last"))
        self.saved_step = self.step

    def evaluate(self, part: str, episodes: int) -> dict[str, Any]:
        return self.experiment.evaluate(part, episodes, self.processes)

    def test(self) -> dict[str, Any]:
        """Test the checkpoint train.test_checkpoint names (best.pt by default) on the fixed test
        episodes and write results.json and test_episodes.json."""
        tested = files.checkpoint_file(self.run_dir, self.cfg.train.test_checkpoint.value)
        self.processes.barrier()  # rank 0 has written the checkpoints
        ensemble: dict[str, Any] = {}
        if self.cfg.eval.ensemble_top_k > 1 and self.top.members:
            test = self.test_ensemble()
            ensemble = self.top.entry()
        else:
            if self.cfg.eval.ensemble_top_k > 1:
                self.progress.write(
                    f"eval.ensemble_top_k={self.cfg.eval.ensemble_top_k}, but this run kept no "
                    f"validation checkpoints to average (it trained with eval.ensemble_top_k=1): "
                    f"testing checkpoints/{tested.name} alone"
                )
            state = load_checkpoint(tested, self.device) if tested.exists() else None
            if state is not None:
                self.learner.load_state_dict(state["learner"])
            self.keep_base_statistics(state, tested)
            test = self.evaluate("test", self.cfg.eval.episodes)
        score = self.score
        results = {
            **files.test_results(test, score, self.cfg, self.experiment.head_entries()),
            **ensemble,
            **files.best_val_entry(score, self.best_val),
            "steps": self.step,
            "wall_time_s": self.elapsed(),
            "processes": self.processes.world_size,
            **({"init": self.init} if self.init else {}),
            "config": config_container(self.cfg),
        }
        if not self.processes.main:
            return results
        identity = files.protocol_identity(self.cfg, self.dataset)
        files.write_test(self.run_dir, results, test, score, identity)
        self.record("test", {"loss": test["loss"], score.name: test[score.name]})
        print(f"test {score.describe(test)} ({files.test_conditions(results)})")
        figures = []
        if isinstance(self.dataset, TaskDataset):  # e.g. sinusoid's adaptation.png
            figures = self.dataset.figures(self.learner, self.samplers["test"], self.run_dir)
        if self.log is not None:
            summary = files.score_entries(score, test[score.name], self.best_val)
            kept = [files.results_file(self.run_dir), files.test_episodes_file(self.run_dir)]
            self.log.finish(results, {**summary, "ci95": test["ci95"]}, kept + figures)
        return results

    def test_ensemble(self) -> dict[str, Any]:
        """The members' query class probabilities on the fixed test episodes, averaged: the test of
        eval.ensemble_top_k, with the keys of one model's test (metarun.evaluation)."""
        cfg, members = self.cfg.eval, self.top.members
        if len(members) < cfg.ensemble_top_k:
            n, steps = len(members), ", ".join(str(m["step"]) for m in members)
            self.progress.write(
                f"eval.ensemble_top_k={cfg.ensemble_top_k}, but the run has kept only {n} "
                f"validation checkpoint{'s' if n > 1 else ''} (step{'s' if n > 1 else ''} "
                f"{steps}): the test averages {'those' if n > 1 else 'that one'}"
            )
        return ensemble_evaluate(
            self.experiment.tester,
            members,
            self.load_member,
            self.samplers["test"],
            cfg.episodes,
            cfg.seed,
            cfg.batch_size,
            self.experiment.autocast,
            self.processes,
        )

    def load_member(self, member: dict[str, Any]) -> None:
        """The learner with an ensemble member's weights, and the heads with its statistics."""
        path = self.top.file(member)
        state = load_checkpoint(path, self.device)
        self.learner.load_state_dict(state["learner"])
        self.keep_base_statistics(state, path)

    def keep_base_statistics(self, state: Optional[dict[str, Any]], tested: Path) -> None:
        """The training images' mean embedding with the tested weights, kept in their checkpoint (so that
        any head can test the run later, metarun.heads.base_statistics) and given to the heads
        that need it now."""
        statistics = (state or {}).get("base_statistics") or self.experiment.base_statistics()
        if state is not None and statistics is not None and "base_statistics" not in state:
            if self.processes.main:
                save_checkpoint({**state, "base_statistics": statistics}, tested)
        self.experiment.give_base_statistics(statistics, "this run")

    def normalization(self) -> Optional[dict[str, list[float]]]:
        """The mean and std the learner's images are normalized with, as checkpoints record them."""
        return statistics(self.experiment)

    def record(self, split: str, values: dict[str, float]) -> None:
        if self.log is not None:
            self.log.scalars(split, self.step, values)

    def elapsed(self) -> float:
        """Seconds this run has trained and tested, over all its starts in this directory."""
        return self.wall_time_s + time.perf_counter() - self.started

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
                fix = (
                    "free space there, then the same command resumes from checkpoints/last.pt "
                    f"(step {self.saved_step})"
                )
            raise failed.with_fix(fix) from failed.error

    # -- divergence (metarun.divergence): nothing non-finite is logged, saved or made the best ----
    def stop_if_diverged(self) -> None:
        """Raise Diverged if the steps since the last check hold a run of non-finite losses or
        gradient norms (one sync); every rank raises together."""
        found = self.nonfinite.check()
        if not self.processes.any(found is not None, self.device):
            return
        if found is None:
            what = f"by step {self.step} another process's loss or gradient became NaN or infinite"
            raise self.diverged(what)
        raise self.diverged(describe_step(found, fp16=self.scaler.is_enabled()))

    def check_weights(self) -> None:
        """The learner's weights and buffers are finite, as every checkpoint must hold them (the
        ranks hold the same ones, so they agree)."""
        bad = nonfinite_entries(self.learner.state_dict())
        if bad:
            what = f"after step {self.step} the learner's {bad[0]} holds NaN or infinite values"
            raise self.diverged(what)

    def check_validation(self, val: dict[str, Any], what: str) -> None:
        score, loss = val[self.score.name], val["loss"]
        if not (math.isfinite(score) and math.isfinite(loss)):
            raise self.diverged(f"{what}: validation {self.score.name} {score:g}, loss {loss:g}")

    def diverged(self, what: str) -> Diverged:
        kept = (
            "no checkpoint was written"
            if self.saved_step is None
            else f"checkpoints/last.pt keeps step {self.saved_step}, its last finite weights"
        )
        fix = remedies(self.cfg, self.optimizer.param_groups[0]["lr"])
        return Diverged(f"{what}; the run diverged: {fix}, in a new hydra.run.dir ({kept})")

    # -- state ------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything a resumed run needs; on several processes every rank must call it together."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        generators = {
            "train_sampler": self.generator.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": cuda,
        }
        ranks = self.processes.gather(generators)
        return {
            "learner": self.learner.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "best_val": self.best_val,
            "top_k": self.top.saved(),  # eval.ensemble_top_k's members, best first
            "wall_time_s": self.elapsed(),
            # Each rank's generators: rank 0's under "rng", all of them under "rng_per_rank".
            "rng": ranks[0],
            **({"rng_per_rank": ranks} if self.processes.several else {}),
            "world_size": self.processes.world_size,
            "device": self.device.type,  # the generators' states above are of this device type
            "normalization": self.normalization(),  # what it learned on (metarun.saved_run)
            "init": self.init,
            "config": config_container(self.cfg),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        path = files.checkpoint_file(self.run_dir, "last")
        machine_local = tuple(f"dataset.{key}" for key in self.dataset.machine_local)
        saved_cfg, cfg = state.get("config", {}), config_container(self.cfg)
        changed = config_changes(saved_cfg, cfg, machine_local)
        if changed:
            raise MetarunError(
                f"{self.run_dir} holds a run with a different config ({changed[0]}); "
                "resume with the same overrides or choose a new hydra.run.dir"
            )
        self.eval_changes = validation_changes(saved_cfg, cfg)
        saved, world_size = state.get("world_size", 1), self.processes.world_size
        if saved != world_size:
            raise MetarunError(
                f"{path} was written by {saved} processes and this run has {world_size}; resume "
                f"with as many (torchrun --nproc_per_node={saved}) or choose a new hydra.run.dir"
            )
        try:
            self.learner.load_state_dict(state["learner"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.step = self.saved_step = state["step"]
            # Runs before the score had a name of its own kept best_val_accuracy.
            self.best_val = state["best_val"] if "best_val" in state else state["best_val_accuracy"]
            self.wall_time_s = state.get("wall_time_s", 0.0)
            self.top.resume(state.get("top_k", []))
            self.init = state.get("init")
            several = self.processes.several
            rng = state["rng_per_rank"][self.processes.rank] if several else state["rng"]
            self.resume_generator(state.get("device", self.device.type), rng["train_sampler"], path)
            torch.set_rng_state(rng["torch"].cpu())
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise MetarunError(
                f"{path} does not match this run ({type(e).__name__}); delete it to start over or "
                "choose a new hydra.run.dir"
            ) from e

    def resume_generator(self, saved_device: str, saved_state: torch.Tensor, path: Path) -> None:
        """The task generator where last.pt left it; written on another device type, whose generator
        state this one cannot take (CPU and CUDA generators differ), restarted from a seed of
        (seed, step) instead, with one warning: the resumed tasks then differ from an
        uninterrupted run's."""
        if saved_device == self.device.type:
            self.generator.set_state(saved_state.cpu())
            return
        self.generator.manual_seed(episode_seed(self.processes.seed(self.cfg.seed), self.step))
        warnings.warn(
            f"{path} was written on {saved_device} and this run resumes on {self.device.type}, "
            f"whose task generator cannot take its state: it restarts from a seed of (seed, step "
            f"{self.step}), so the tasks from step {self.step} on differ from those of an "
            "uninterrupted run",
            stacklevel=3,
        )


def parameter_groups(learner: torch.nn.Module, lr: float) -> Any:
    """What the optimizer trains: the learner's own groups where it trains parts at their own rates
    (FEAT's attention at lr_mul times `lr`), else all its parameters at `lr`."""
    groups = getattr(learner, "parameter_groups", None)
    return groups(lr) if groups is not None else learner.parameters()


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
    chunk's graph. The metrics, means over tasks, are weighted the same way. With
    `learner.task_workers` other than 1 the chunks run on worker threads and their gradients and
    batch-norm statistics join in chunk order, to the same sums (metarun.task_workers).
    """
    chunks = learner.task_chunks(tasks)
    workers, threads = threads_for(learner.task_workers, len(chunks), training_pays(learner))

    def chunk_loss(runner: MetaLearner, chunk: TaskBatch) -> tuple[torch.Tensor, dict, float]:
        share = len(chunk) / len(tasks)
        with autocast():
            loss, chunk_metrics = runner(chunk, diagnostics=diagnostics, loss_scale=loss_scale)
        return scale(loss * share), chunk_metrics, share

    metrics: dict[str, torch.Tensor] = {}
    if workers == 1:
        for chunk in chunks:
            loss, chunk_metrics, share = chunk_loss(learner, chunk)
            loss.backward()
            add_weighted(metrics, chunk_metrics, share)
    else:
        params = [p for p in learner.parameters() if p.requires_grad]
        # A GradScaler makes its scale tensor on its first call: here, before the workers share it.
        scale(torch.zeros((), device=tasks.support_x.device))

        def chunk_gradient(runner: MetaLearner, chunk: TaskBatch) -> tuple:
            loss, chunk_metrics, share = chunk_loss(runner, chunk)
            return torch.autograd.grad(loss, params, allow_unused=True), chunk_metrics, share

        for grads, chunk_metrics, share in in_order(
            learner, chunks, chunk_gradient, workers, threads
        ):
            accumulate_grad(params, grads)
            add_weighted(metrics, chunk_metrics, share)
    commit_running_statistics(learner)  # one update per meta-batch, whatever the chunks
    return metrics


def add_weighted(
    total: dict[str, torch.Tensor], metrics: dict[str, torch.Tensor], share: float
) -> None:
    for name, value in metrics.items():
        total[name] = total.get(name, 0.0) + share * value


def accumulate_grad(params: list[torch.nn.Parameter], grads: tuple) -> None:
    """Add `grads` into the parameters' `.grad` as backward() does (a copy in the parameter's layout
    where there is none yet, else an in-place sum; None adds nothing)."""
    for param, grad in zip(params, grads):
        if grad is None:
            continue
        if param.grad is None:
            param.grad = torch.empty_like(param).copy_(grad)
        else:
            param.grad += grad


def check_places(cfg: DictConfig, run_dir: Optional[Path]) -> None:
    """A run directory, and a dataset cache, that cannot be written are one line before any work
    (a probe file each, removed again), not a failed write hours into the run. A cache folder that
    already holds files is only read when they are current, so one shared read-only passes."""
    if run_dir is not None:
        check_writable(run_dir, "choose another hydra.run.dir")
    if "cache_dir" in cfg.dataset:
        cache = Path(cfg.dataset.cache_dir or default_cache_dir()).expanduser()
        if not (cache.is_dir() and any(cache.iterdir())):
            fix = "set dataset.cache_dir (or METARUN_CACHE) to a folder you can write"
            check_writable(cache, fix)
