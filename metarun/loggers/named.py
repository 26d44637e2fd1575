"""The loggers a config names (`logger=...`), built and checked, and the run described to them."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from metarun.config import hparams
from metarun.errors import MetarunError
from metarun.loggers.base import Logger, RunInfo, git_commit
from metarun.loggers.csv_file import CSVLogger
from metarun.loggers.mlflow import MLflowLogger
from metarun.loggers.tensorboard import TensorBoardLogger
from metarun.loggers.wandb import WandbLogger

LOGGERS: dict[str, type[Logger]] = {
    "tensorboard": TensorBoardLogger,
    "csv": CSVLogger,
    "mlflow": MLflowLogger,
    "wandb": WandbLogger,
}


def build_loggers(cfg: DictConfig) -> list[Logger]:
    """The loggers `cfg.logger` names, each checked (its package, its server): one line if not."""
    chosen = OmegaConf.to_container(cfg.logger, resolve=True) if cfg.get("logger") else {}
    loggers = []
    for name, options in chosen.items():
        if name not in LOGGERS:
            raise MetarunError(
                f"logger {name} is not one metarun has; choose from: {', '.join(LOGGERS)} "
                "(logger=NAME or logger=[NAME,NAME])"
            )
        options = options or {}
        keys = [k for k in inspect.signature(LOGGERS[name]).parameters]
        unknown = sorted(set(options) - set(keys))
        if unknown:
            raise MetarunError(
                f"logger.{name}.{unknown[0]} is not a key of logger={name}; its keys: "
                f"{', '.join(keys) or 'none'} (conf/logger/{name}.yaml)"
            )
        logger = LOGGERS[name](**options)
        logger.check()
        loggers.append(logger)
    return loggers


def run_info(cfg: DictConfig, run_dir: Path, with_commit: bool = True) -> RunInfo:
    """The run as the trackers describe it: its directory and name, the flattened config, the
    command line's overrides, for a sweep's job the sweep and the keys it varies, and (with_commit:
    two git calls, made only for the trackers that keep it) the code's commit."""
    run_dir = Path(run_dir)
    overrides, sweep, varying = [], None, []
    hydra = hydra_config()
    if hydra is not None:
        overrides = list(hydra.overrides.task)
        if str(hydra.mode) == "RunMode.MULTIRUN":
            sweep = str(hydra.sweep.dir)
            varying = swept_keys(hydra, Path(sweep))
    name = f"{sweep}/{run_dir.name}" if sweep else run_dir.name
    params = {k: v for k, v in hparams(cfg).items() if not k.startswith("logger.")}
    commit = git_commit(Path(__file__).resolve().parent) if with_commit else None
    return RunInfo(run_dir, name, params, overrides, sweep, varying, commit)


def hydra_config() -> Optional[Any]:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def swept_keys(hydra: Any, sweep_dir: Path) -> list[str]:
    """The keys a sweep varies: the sweeper's search space (the Optuna sweeper's params), and the
    command line's sweeps (`key=a,b`), which Hydra's basic sweeper keeps in multirun.yaml."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = list(OmegaConf.select(hydra, "sweeper.params", default=None) or {})
    recorded = sweep_dir / "multirun.yaml"
    if recorded.exists():
        lines = OmegaConf.select(OmegaConf.load(recorded), "hydra.overrides.task", default=[])
        parsed = OverridesParser.create().parse_overrides(list(lines))
        keys += [o.key_or_group for o in parsed if o.is_sweep_override()]
    return sorted(set(keys) - {"hydra.sweep.subdir"})
