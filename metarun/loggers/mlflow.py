"""logger=mlflow: one MLflow run per metarun run, in a tracking store (by default a local SQLite
database, outputs/mlflow.db; or a server's URI). A sweep's jobs are runs of one experiment, named
after the sweep's directory, each tagged with its overrides; a resumed run continues its MLflow run
(its id is in the run's loggers.json). `mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db`
shows them."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

from metarun.errors import MetarunError
from metarun.loggers.base import Logger, RunInfo, needs, remember, remembered

BATCH = 100  # MLflow takes at most 100 params and 1000 metrics per log_batch call
STATUS = {"finished": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}


class MLflowLogger(Logger):
    name = "mlflow"
    remote = True

    def __init__(
        self,
        tracking_uri: str = "sqlite:///outputs/mlflow.db",
        experiment: Optional[str] = None,
        artifact_location: Optional[str] = None,
        timeout_s: float = 10.0,
    ):
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.artifact_location, self.timeout_s = artifact_location, timeout_s

    def check(self) -> None:
        needs("mlflow", "mlflow")
        uri = self.tracking_uri
        if uri.startswith(("http://", "https://")):
            try:
                urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=self.timeout_s)
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                raise MetarunError(
                    f"logger=mlflow: the tracking server {uri} does not answer ({reason}); start "
                    "it, or set logger.mlflow.tracking_uri to one that runs (the default, "
                    "sqlite:///outputs/mlflow.db, needs no server)"
                ) from None
        elif uri.startswith("sqlite:///"):
            database = Path(uri.removeprefix("sqlite:///"))
            if database.parent.exists() and not database.parent.is_dir():
                raise MetarunError(
                    f"logger=mlflow: {database.parent} is a file, so {database} cannot be made; "
                    "set logger.mlflow.tracking_uri=sqlite:///<a folder>/mlflow.db"
                )

    def start(self, info: RunInfo) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri.removeprefix("sqlite:///")).parent.mkdir(
                parents=True, exist_ok=True
            )
        self.client = client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = self.experiment or (info.sweep or "metarun")
        kept = remembered(info.run_dir, self.name)
        run = None
        if kept and kept.get("tracking_uri") == self.tracking_uri:
            run = self.existing_run(kept["run_id"])
        if run is None:
            tags = {**info.tags(), "mlflow.runName": info.name}
            if info.varying:
                tags["sweep.varying"] = ",".join(info.varying)
            run = client.create_run(self.experiment_id(experiment), run_name=info.name, tags=tags)
            remember(
                info.run_dir,
                self.name,
                {"run_id": run.info.run_id, "tracking_uri": self.tracking_uri},
            )
            logged: dict[str, str] = {}
        else:
            client.update_run(run.info.run_id, status="RUNNING")
            logged = dict(run.data.params)
        self.run_id = run.info.run_id
        # MLflow's params cannot change: a resumed run adds only those it did not have (what a
        # resume may change, eval.* and train.steps, stays as the first start logged it).
        params = [
            Param(key, str(value)[:6000]) for key, value in info.params.items() if key not in logged
        ]
        for start in range(0, len(params), BATCH):
            client.log_batch(self.run_id, params=params[start : start + BATCH])

    def existing_run(self, run_id: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id)
        except MlflowException:
            return None  # deleted from the store: a new MLflow run

    def experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=self.artifacts_root())
        except MlflowException:  # another job of the sweep made it first
            return self.client.get_experiment_by_name(name).experiment_id

    def artifacts_root(self) -> Optional[str]:
        """Beside a SQLite store its artifacts (mlartifacts/ next to the database), as
        `mlflow ui` finds them; a server keeps its own."""
        if self.artifact_location:
            return self.artifact_location
        if self.tracking_uri.startswith("sqlite:///"):
            database = Path(self.tracking_uri.removeprefix("sqlite:///")).resolve()
            return (database.parent / "mlartifacts").as_uri()
        return None

    def scalars(self, split: str, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(f"{split}/{name}", float(v), now, step) for name, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def result(self, results: dict[str, Any], summary: dict[str, float]) -> None:
        from mlflow.entities import Metric, RunTag

        now, step = int(time.time() * 1000), int(results.get("steps", 0))
        metrics = [Metric(key, float(value), now, step) for key, value in summary.items()]
        conditions = {k: results[k] for k in ("batch_norm", "head", "transductive") if k in results}
        tags = [RunTag(key, str(value)) for key, value in conditions.items()]
        self.client.log_batch(self.run_id, metrics=metrics, tags=tags)

    def artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))

    def close(self, status: str = "finished") -> None:
        if getattr(self, "run_id", None) is not None:
            self.client.set_terminated(self.run_id, status=STATUS[status])
