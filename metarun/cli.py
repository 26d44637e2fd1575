"""`metarun key=value ...`: Hydra composes conf/, the Trainer trains and meta-tests; nothing else."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from metarun import config  # noqa: F401  (registers the schema that conf/config.yaml names)
from metarun.errors import MetarunError, warnings_as_lines
from metarun.hydra_errors import one_line_composition_errors
from metarun.trainer import Trainer


@hydra.main(version_base="1.3", config_path="pkg://metarun.conf", config_name="config")
def run(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    existed = run_dir.exists() and any(run_dir.iterdir())
    try:
        results = Trainer(cfg, run_dir).run()
    except MetarunError as e:
        if not existed and run_dir.exists() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # Hydra made it for us; a run that never started leaves nothing behind
        print(f"metarun: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"metarun: interrupted; `metarun ... hydra.run.dir={run_dir}` with the same overrides resumes "
              "from its last checkpoint", file=sys.stderr)
        sys.exit(130)
    # What a Hydra sweeper (e.g. Optuna) optimizes, higher is better: accuracy, or minus a regression's MSE.
    return results["test_accuracy"] if "test_accuracy" in results else -results["test_mse"]


def main() -> None:
    warnings_as_lines("metarun")
    with one_line_composition_errors():
        run()


if __name__ == "__main__":
    main()
