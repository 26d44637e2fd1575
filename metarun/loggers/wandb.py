"""logger=wandb: one Weights & Biases run per metarun run, online where the machine has an API key
(`wandb login`, or WANDB_API_KEY), else offline into the run's wandb/ folder, which
`wandb sync RUN_DIR/wandb/offline-run-*` uploads later. A sweep's jobs are one group, named after
the sweep's directory; a resumed run resumes its W&B run (its id is in the run's loggers.json)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from metarun.errors import MetarunError
from metarun.loggers.base import Logger, RunInfo, needs, remember, remembered

MODES = ("auto", "online", "offline")


class WandbLogger(Logger):
    name = "wandb"
    remote = True

    def __init__(
        self,
        project: str = "metarun",
        entity: Optional[str] = None,
        mode: str = "auto",
        group: Optional[str] = None,
    ):
        if mode not in MODES:
            raise MetarunError(
                f"logger.wandb.mode={mode} is not a mode; choose one of: {', '.join(MODES)}"
            )
        self.project, self.entity, self.mode, self.group = project, entity, mode, group

    def check(self) -> None:
        wandb = needs("wandb", "wandb")
        if self.mode == "auto":
            self.mode = "online" if has_api_key(wandb) else "offline"
            if self.mode == "offline":
                print(
                    "logger=wandb: no W&B API key (wandb login, or WANDB_API_KEY): logging "
                    "offline into the run's wandb/ folder; `wandb sync` uploads it later"
                )

    def start(self, info: RunInfo) -> None:
        import wandb

        kept = remembered(info.run_dir, self.name)
        run_id = kept["id"] if kept else None  # None: W&B makes one
        config = {**info.params, "overrides": info.overrides}
        try:
            self.run = wandb.init(
                project=self.project,
                entity=self.entity,
                name=info.name,
                group=self.group or info.sweep,
                id=run_id,
                resume="allow" if kept else None,
                mode=self.mode,
                dir=str(info.run_dir),
                config=config,
                notes=f"run directory {info.run_dir}",
                settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
            )
        except Exception as e:
            raise MetarunError(
                f"logger=wandb could not start its run ({type(e).__name__}: {str(e).strip()[:200]}); "
                "set logger.wandb.mode=offline to log without the network"
            ) from None
        if not kept:
            remember(info.run_dir, self.name, {"id": self.run.id})
        commit = {"git_commit": info.git_commit} if info.git_commit else {}
        self.run.config.update({"run_dir": str(info.run_dir), **commit}, allow_val_change=True)

    def scalars(self, split: str, step: int, values: dict[str, float]) -> None:
        self.run.log({f"{split}/{name}": value for name, value in values.items()}, step=step)

    def result(self, results: dict[str, Any], summary: dict[str, float]) -> None:
        conditions = {k: results[k] for k in ("batch_norm", "head", "transductive") if k in results}
        self.run.summary.update({**summary, **conditions})

    def artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            self.run.save(str(path), base_path=str(path.parent), policy="now")

    def close(self, status: str = "finished") -> None:
        if getattr(self, "run", None) is not None:
            self.run.finish(exit_code=0 if status == "finished" else 1)


def has_api_key(wandb: Any) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return bool(wandb.api.api_key)
    except Exception:
        return False
