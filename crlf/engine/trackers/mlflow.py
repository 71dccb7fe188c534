"""MLflow: one run in a local file store RUN/mlruns (or the server MLFLOW_TRACKING_URI names), continued by its
recorded id. MLflow cannot delete a metric point, so a continued run logs only the points after the last step the
store already holds for that metric: a rolled-back epoch keeps the values first logged (the same ones on a CPU,
where a resume is exact) and no step appears twice."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from crlf.engine.trackers.base import flat_config, register

EXPERIMENT = "crlf"  # unless MLFLOW_EXPERIMENT_NAME says otherwise


@register
class MLflow:
    """--logger mlflow: metrics with explicit steps, the config as parameters (and config.json as an artifact),
    figures as artifacts under figures/."""

    name = "mlflow"
    package = "mlflow"

    def __init__(self) -> None:
        self.client: Any = None
        self.run_id = ""
        self.logged: dict[str, int] = {}  # per metric, the last step the store holds

    def start(self, run_dir: Path, config: dict[str, Any], resume_step: int | None, recorded: dict[str, Any] | None
              ) -> dict[str, Any]:  # fmt: skip
        uri = os.environ.get("MLFLOW_TRACKING_URI") or _local_store(run_dir)
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        run_id = recorded.get("run_id") if recorded else None
        if isinstance(run_id, str) and re.fullmatch(r"[0-9a-f]{32}", run_id):  # an id crlf recorded, nothing else
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            run = self.client.get_run(run_id)
            for key in run.data.metrics:
                self.logged[key] = max(m.step for m in self.client.get_metric_history(run_id, key))
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found is not None else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment, run_name=run_dir.name).info.run_id
            from mlflow.entities import Param

            params = [Param(k[:250], str(v)[:6000]) for k, v in flat_config(config).items()]
            for i in range(0, len(params), 100):  # MLflow's batch limit
                self.client.log_batch(self.run_id, params=params[i : i + 100])
        self.client.log_dict(self.run_id, config, "config.json")  # the settings of this session (epochs may grow)
        return {"run_id": self.run_id}

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        new = [Metric(k, v, stamp, step) for k, v in metrics.items() if step > self.logged.get(k, -1)]
        if new:
            self.client.log_batch(self.run_id, metrics=new)
            self.logged.update({m.key: step for m in new})

    def log_figure(self, name: str, path: Path, step: int) -> None:
        self.client.log_artifact(self.run_id, str(path), "figures")

    def flush(self) -> None:
        """Nothing: every batch is written (or sent) when it is logged."""

    def close(self, status: str) -> None:
        state = {"finished": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self.run_id, status=state)


def _local_store(run_dir: Path) -> str:
    """RUN/mlruns as a file-store URI; MLflow 3 serves a file store only when MLFLOW_ALLOW_FILE_STORE says so (its
    database stores need SQLAlchemy, which mlflow-skinny lacks), so this process says so."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (run_dir / "mlruns").resolve().as_uri()
