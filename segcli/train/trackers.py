"""Experiment trackers a run also logs to (`--tracker tensorboard,mlflow`), each an optional
extra. `metrics.jsonl` stays the record: a tracker that fails to start or to log is reported
once and dropped, and training goes on."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from segcli.errors import UsageError

TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # name -> module it needs
# Run-folder entries not uploaded as artifacts: the rasterised-mask cache can be large and is
# rebuilt from the dataset.
SKIPPED_ARTIFACTS = ("cache",)


class Tracker(Protocol):
    name: str

    def log_epoch(self, record: dict[str, Any], class_names: list[str]) -> None: ...

    def finish(self, run: Path, summary: dict[str, Any] | None, status: str) -> None: ...


def tracker_names(spec: str | None) -> list[str]:
    """`--tracker` as names, each checked to be known and installed (exit 2 otherwise)."""
    names = [part.strip() for part in (spec or "").split(",") if part.strip()]
    for name in names:
        if name not in TRACKERS:
            raise UsageError(f"`tracker` {name}: unknown; valid: {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise UsageError(
                f"`tracker` {name}: the {TRACKERS[name]} package is not installed; "
                f"pip install 'segcli[{name}]'"
            )
    return names


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as one level of `key` / `outer.inner` keys with scalar values (None as
    "none"), as trackers' hyper-parameter tables want them."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = "none" if value is None else str(value)
    return flat


def epoch_scalars(record: dict[str, Any], class_names: list[str]) -> dict[str, float]:
    """The numbers of one metrics.jsonl record, named as trackers show them."""
    val = record.get("val", {})
    scalars = {
        "loss/train": record.get("train_loss"),
        "loss/val": record.get("val_loss"),
        "lr": record.get("lr"),
        "val/miou": val.get("miou"),
        "val/mdice": val.get("mdice"),
        "val/pixel_acc": val.get("pixel_acc"),
    }
    for name, iou in zip(class_names, val.get("iou", []), strict=False):
        scalars[f"iou/{name}"] = iou
    return {key: float(value) for key, value in scalars.items() if value is not None}


class TensorBoardTracker:
    """Event files in RUN/tensorboard: scalars per epoch, the resolved config as text, the
    preview images and the hyper-parameters with the final metrics."""

    name = "tensorboard"

    def __init__(self, run: Path, config: dict[str, Any], config_toml: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.config = config
        self.writer = SummaryWriter(log_dir=str(run / "tensorboard"))
        self.writer.add_text("config", "```\n" + config_toml + "\n```")

    def log_epoch(self, record: dict[str, Any], class_names: list[str]) -> None:
        for key, value in epoch_scalars(record, class_names).items():
            self.writer.add_scalar(key, value, record["epoch"])
        self.writer.flush()

    def finish(self, run: Path, summary: dict[str, Any] | None, status: str) -> None:
        import numpy as np
        from PIL import Image

        for path in sorted(run.glob("preview_*.png")):
            pixels = np.asarray(Image.open(path).convert("RGB"))
            self.writer.add_image(path.stem, pixels, dataformats="HWC")
        if summary is not None:
            final = {
                "hparam/best_miou": summary["val"].get("miou") or 0.0,
                "hparam/best_epoch": float(summary["best_epoch"]),
            }
            self.writer.add_hparams(flat_params(self.config), final, run_name=".")
        self.writer.close()


class MlflowTracker:
    """An MLflow run (experiment "segcli") in MLFLOW_TRACKING_URI, else ./mlruns: the
    settings as params, the metrics of every epoch, the run folder's files as artifacts."""

    name = "mlflow"

    def __init__(self, run: Path, config: dict[str, Any], config_toml: str) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or Path("mlruns").resolve().as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3.7+ keeps its file store in maintenance mode and refuses it unless this
            # is set; a local folder is what needs no server and no database package.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name("segcli")
        experiment_id = (
            experiment.experiment_id if experiment else self.client.create_experiment("segcli")
        )
        self.run_id = self.client.create_run(experiment_id, run_name=run.name).info.run_id
        # MLflow caps a param value at 6000 characters and a batch at 100 params.
        params = [Param(k, str(v)[:6000]) for k, v in flat_params(config).items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log_epoch(self, record: dict[str, Any], class_names: list[str]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(key.replace("/", "_"), value, now, record["epoch"])
            for key, value in epoch_scalars(record, class_names).items()
        ]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, run: Path, summary: dict[str, Any] | None, status: str) -> None:
        for path in sorted(run.iterdir()):
            if path.name in SKIPPED_ARTIFACTS:
                continue
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), path.name)
            else:
                self.client.log_artifact(self.run_id, str(path))
        states = {"finished": "FINISHED", "interrupted": "KILLED"}
        self.client.set_terminated(self.run_id, states.get(status, "FAILED"))


FACTORIES: dict[str, Callable[[Path, dict[str, Any], str], Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "mlflow": MlflowTracker,
}


class Trackers:
    """The run's trackers; a failing one is reported through `warn` once and dropped."""

    def __init__(
        self,
        names: list[str],
        run: Path,
        config: dict[str, Any],
        config_toml: str,
        warn: Callable[[str], None],
    ) -> None:
        self.warn = warn
        self.active: list[Tracker] = []
        for name in names:
            try:
                self.active.append(FACTORIES[name](run, config, config_toml))
            except Exception as error:  # any backend failure: the run goes on without it
                warn(f"`tracker` {name}: could not start ({_reason(error)}); training goes on")

    def _each(self, call: Callable[[Tracker], None], what: str) -> None:
        for tracker in list(self.active):
            try:
                call(tracker)
            except Exception as error:
                self.active.remove(tracker)
                warn = f"`tracker` {tracker.name}: failed to {what} ({_reason(error)}); dropped"
                self.warn(warn)

    def log_epoch(self, record: dict[str, Any], class_names: list[str]) -> None:
        self._each(lambda tracker: tracker.log_epoch(record, class_names), "log an epoch")

    def finish(self, run: Path, summary: dict[str, Any] | None, status: str) -> None:
        self._each(lambda tracker: tracker.finish(run, summary, status), "finish")


def _reason(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
