"""EMA weights, experiment trackers and `seg runs`, on the bundled mock data at 32x32."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from segcli.errors import UsageError
from segcli.train.config import TrainConfig, resolve_config
from segcli.train.ema import build_ema
from segcli.train.state import load_training_state
from segcli.train.trainer import SilentEvents, Trainer, TrainingInterrupted
from tests.helpers import fast_train_config

# --- EMA -------------------------------------------------------------------------------------


class Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.norm = nn.BatchNorm1d(1)


def test_ema_follows_the_hand_computed_rule() -> None:
    # Catches: decay applied the wrong way round (the average jumping to the newest weights),
    # no warm-up, BatchNorm statistics left at their initial values, the step counter averaged.
    model = Scalar()
    ema = build_ema(model, decay=0.5)
    for value in (1.0, 3.0, 7.0):
        with torch.no_grad():
            model.weight.fill_(value)
            model.norm.running_mean.fill_(value * 10)
            model.norm.num_batches_tracked.fill_(int(value))
        ema.update_parameters(model)
    # First update copies (1); then d = min(0.5, 2/11) and min(0.5, 3/12):
    # e2 = 1 + (9/11)(3 - 1) = 29/11; e3 = 29/11 + 0.75 (7 - 29/11) = 65/11.
    assert ema.module.weight.item() == pytest.approx(65 / 11, abs=1e-6)
    assert ema.module.norm.running_mean.item() == pytest.approx(650 / 11, abs=1e-5)
    assert ema.module.norm.num_batches_tracked.item() == 7
    late = build_ema(Scalar(), decay=0.1)  # past the warm-up: d = 0.1 from the second update
    late.update_parameters(model)
    with torch.no_grad():
        model.weight.fill_(2.0)
    late.update_parameters(model)
    assert late.module.weight.item() == pytest.approx(0.1 * 7 + 0.9 * 2, abs=1e-6)


def test_ema_run_saves_the_average_and_resumes_exactly(tmp_path: Path) -> None:
    # Catches: the raw weights saved as the run's weights, the EMA restarted (or the raw
    # weights replaced by the average) on resume: 1 + 1 epochs must equal 2 straight ones.
    common = {"deterministic": True, "scheduler": "step", "step_size": 1, "ema": 0.9}
    Trainer(fast_train_config(tmp_path / "a", epochs=2, **common)).run()
    Trainer(fast_train_config(tmp_path / "b", epochs=1, **common)).run()
    last = str(tmp_path / "b" / "last.safetensors")
    Trainer(fast_train_config(tmp_path / "b", epochs=2, resume=last, **common)).run()
    for name in ("last.safetensors",):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    state = load_training_state(tmp_path / "a" / "last.state.safetensors")
    weights = load_file(str(tmp_path / "a" / "last.safetensors"))
    raw = state["model"]
    assert state["ema_updates"] == 2 * 3  # 24 images / batch 8, two epochs
    differs = [key for key in weights if weights[key].is_floating_point()]
    assert any(
        not torch.equal(weights[key], raw[key].reshape(weights[key].shape)) for key in differs
    )
    other = load_training_state(tmp_path / "b" / "last.state.safetensors")["model"]
    for key in raw:
        torch.testing.assert_close(raw[key], other[key], rtol=0, atol=0, msg=key)


def test_ema_is_on_by_default_and_zero_turns_it_off(tmp_path: Path) -> None:
    # Catches: the 0.99 default not reaching the trainer (checkpoints holding raw weights), and
    # `--ema 0` refused or still averaging.
    Trainer(fast_train_config(tmp_path / "default")).run()
    Trainer(fast_train_config(tmp_path / "off", ema=0.0)).run()
    averaged = load_training_state(tmp_path / "default" / "last.state.safetensors")
    raw = load_training_state(tmp_path / "off" / "last.state.safetensors")
    assert averaged["ema_updates"] == 3  # 24 mock images / batch 8
    assert "ema_updates" not in raw and "model" not in raw


def test_a_run_from_before_the_ema_default_resumes_without_it() -> None:
    # Catches: resuming a run whose stored settings say `ema = None` (runs before the default)
    # with the new default, which would restart an average from its raw weights mid-run.
    assert not resolve_config(None, {}, base={"ema": None}).ema
    assert resolve_config(None, {}).ema == 0.99


@pytest.mark.parametrize("decay", ["1", "-0.5", "1.5"])
def test_ema_outside_zero_one_is_refused(seg, decay: str) -> None:
    result = seg("train", "unet", "--backbone", "none", "--epochs", "1", "--ema", decay)
    assert result.returncode == 2 and f"--ema {float(decay)}" in result.stderr
    assert "Traceback" not in result.stderr


# --- trackers --------------------------------------------------------------------------------


def test_tensorboard_event_file_holds_the_logged_scalars(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Catches: scalars not written or written at the wrong step, previews or config missing.
    Trainer(fast_train_config(tmp_path / "run", epochs=2, tracker="tensorboard")).run()
    records = [
        json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    ]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    miou = events.Scalars("val/miou")
    assert [event.step for event in miou] == [1, 2]
    assert [event.value for event in miou] == pytest.approx([r["val"]["miou"] for r in records])
    assert [e.value for e in events.Scalars("loss/train")] == pytest.approx(
        [r["train_loss"] for r in records]
    )
    assert "iou/circle" in events.Tags()["scalars"]
    assert "preview_0" in events.Tags()["images"]


def test_mlflow_run_holds_params_and_metrics(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    # Catches: metrics logged once instead of per epoch, params missing, the run left open.
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    Trainer(fast_train_config(tmp_path / "run", epochs=2, tracker="mlflow")).run()
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("segcli")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.params["arch"] == "unet" and run.data.params["lr"] == "0.001"
    history = client.get_metric_history(run.info.run_id, "val_miou")
    assert [metric.step for metric in history] == [1, 2]
    assert run.info.status == "FINISHED"
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert {"metrics.jsonl", "best.safetensors"} <= artifacts


def test_unknown_or_missing_tracker_is_one_line(seg, monkeypatch) -> None:
    result = seg("train", "unet", "--epochs", "1", "--tracker", "wandb")
    assert result.returncode == 2 and "--tracker wandb: unknown" in result.stderr
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    result = seg("train", "unet", "--epochs", "1", "--tracker", "mlflow")
    assert result.returncode == 2 and "pip install 'segcli[mlflow]'" in result.stderr


def test_a_tracker_that_fails_to_start_does_not_stop_training(tmp_path: Path, monkeypatch) -> None:
    # Catches: a tracker backend error ending the run (metrics.jsonl is the record).
    import segcli.train.trackers as trackers
    import segcli.train.trainer as trainer

    def broken(*args):
        raise ConnectionError("tracking server unreachable")

    monkeypatch.setitem(trackers.FACTORIES, "tensorboard", broken)
    # Whether or not the tensorboard package is installed here, the factory is what fails.
    monkeypatch.setattr(trainer, "tracker_names", lambda spec: ["tensorboard"])
    monkeypatch.setattr(trackers, "tracker_names", lambda spec: ["tensorboard"])
    lines: list[str] = []

    class Events(SilentEvents):
        def log(self, message: str) -> None:
            lines.append(message)

    summary = Trainer(fast_train_config(tmp_path / "run", tracker="tensorboard"), Events()).run()
    assert summary is not None and (tmp_path / "run" / "best.safetensors").is_file()
    expected = "could not start (ConnectionError: tracking server unreachable)"
    assert any(expected in line for line in lines)


# --- seg runs --------------------------------------------------------------------------------


class InterruptAfterFirstEpoch(SilentEvents):
    """Sends this process a SIGINT when the first epoch ends, as Ctrl-C would."""

    def epoch_end(self, record, best) -> None:
        os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture(scope="module")
def runs_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    Trainer(fast_train_config(root / "low-lr", epochs=1, lr=1e-5)).run()
    Trainer(fast_train_config(root / "high-lr", epochs=2, lr=3e-3)).run()
    with pytest.raises(TrainingInterrupted):
        Trainer(fast_train_config(root / "stopped", epochs=3), InterruptAfterFirstEpoch()).run()
    return root


def test_runs_table_sorts_by_score_and_reports_status(seg, runs_folder: Path) -> None:
    # Catches: an interrupted run shown as finished, unsorted rows, epochs done/planned wrong.
    result = seg("runs", str(runs_folder), "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    by_name = {Path(row["run"]).name: row for row in rows}
    assert set(by_name) == {"low-lr", "high-lr", "stopped"}
    scores = [row["best_miou"] for row in rows]
    assert scores == sorted(scores, reverse=True)
    assert by_name["stopped"]["status"] == "interrupted"
    assert (by_name["stopped"]["epochs_done"], by_name["stopped"]["epochs_planned"]) == (1, 3)
    assert by_name["high-lr"]["status"] == "finished" and by_name["high-lr"]["epochs_done"] == 2
    assert by_name["high-lr"]["backbone"] == "resnet18" and by_name["high-lr"]["data"] == "mock"
    metrics = [
        json.loads(line)
        for line in (runs_folder / "high-lr/metrics.jsonl").read_text().splitlines()
    ]
    assert by_name["high-lr"]["best_miou"] == max(r["val"]["miou"] for r in metrics)
    table = seg("runs", str(runs_folder))
    assert table.returncode == 0 and "interrupted" in table.stdout


def test_runs_compare_lists_differences_and_draws_curves(seg, runs_folder: Path, tmp_path) -> None:
    # Catches: identical settings listed as differences, the differing ones missed, no plot.
    plot = tmp_path / "cmp.png"
    result = seg(
        "runs",
        "compare",
        str(runs_folder / "low-lr"),
        str(runs_folder / "high-lr"),
        "--plot",
        str(plot),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["differences"] == {"epochs": [1, 2], "lr": [1e-5, 3e-3]}
    from PIL import Image

    assert Image.open(plot).size == (900, 340)


def test_runs_bad_input_is_one_line(seg, runs_folder: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = seg("runs", str(empty))
    assert result.returncode == 2 and "no run folders" in result.stderr
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(runs_folder / "high-lr", broken)
    with (broken / "metrics.jsonl").open("a") as handle:
        handle.write("{not json\n")
    result = seg("runs", str(tmp_path), "--json")
    assert result.returncode == 2
    assert "metrics.jsonl:3: not a metrics record; skipped" in result.stderr
    assert json.loads(result.stdout)[0]["epochs_done"] == 2  # the good lines still count


def test_bad_config_values_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="`ema`"):
        TrainConfig(ema=1.0).validate()
