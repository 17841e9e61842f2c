"""The training engine and `seg train` / `seg eval`, on the bundled mock data at 32x32."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from segcli.checkpoint import load_model, read_checkpoint
from segcli.errors import RuntimeFailure, UsageError
from segcli.train.config import TrainConfig
from segcli.train.state import load_training_state
from segcli.train.trainer import Trainer
from tests.helpers import fast_train_config

FAST = ["--size", "32", "--batch-size", "8", "--workers", "0", "--previews", "2"]
RUN_FILES = {
    "best.safetensors",
    "last.safetensors",
    "last.state.safetensors",
    "metrics.jsonl",
    "config.toml",
    "curves.png",
    "preview_0.png",
    "preview_1.png",
}


def fast_config(tmp_path: Path, **overrides) -> TrainConfig:
    return fast_train_config(tmp_path / "run", **overrides)


@pytest.mark.parametrize(
    ("arch", "backbone", "extra"),
    [
        ("unet", "resnet18", []),
        ("unet3p", "resnet18", ["--deep-supervision", "--cgm"]),
        ("unetpp", "vgg11", ["--deep-supervision", "--loss", "dice+ce"]),
    ],
)
def test_one_epoch_writes_every_file_and_eval_agrees(seg, tmp_path, arch, backbone, extra):
    out = tmp_path / "run"
    result = seg(
        "train",
        arch,
        "--backbone",
        backbone,
        "--epochs",
        "1",
        *FAST,
        *extra,
        "--out",
        str(out),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert {p.name for p in out.iterdir()} >= RUN_FILES
    (record,) = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"train_loss", "val_loss", "lr", "val", "seconds", "images_per_second"} <= set(record)
    assert summary["val"]["miou"] == pytest.approx(record["val"]["miou"])

    evaluated = seg("eval", str(out / "best.safetensors"), "--workers", "0", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    scores = json.loads(evaluated.stdout)
    assert scores["miou"] == pytest.approx(record["val"]["miou"], abs=1e-9)
    assert scores["iou"] == pytest.approx(record["val"]["iou"], abs=1e-9)
    if arch == "unet":
        full = seg(
            "eval", str(out / "best.safetensors"), "--workers", "0", "--full-res", "--tta", "--json"
        )
        assert full.returncode == 0, full.stderr
        full_scores = json.loads(full.stdout)
        assert full_scores["full_res"] and full_scores["tta"] and full_scores["images"] == 8
        # Catches --full-res scoring at the model's 32x32 instead of each image's own size:
        # the matrix must count every labelled pixel of the val masks as stored on disk.
        import numpy as np
        from PIL import Image

        from segcli.data import mock_root

        masks = sorted((mock_root() / "val" / "masks").iterdir())
        labelled = sum(int((np.asarray(Image.open(path)) != 255).sum()) for path in masks)
        assert int(np.asarray(full_scores["confusion_matrix"]).sum()) == labelled


def test_checkpoint_alone_rebuilds_the_model(tmp_path):
    Trainer(fast_config(tmp_path, arch="unet3p", model_options={"deep_supervision": True})).run()
    path = tmp_path / "run" / "best.safetensors"
    model, info = load_model(path)
    assert info.model["arch"] == "unet3p" and info.model["options"]["deep_supervision"]
    assert info.class_names == ["background", "circle", "rectangle"]
    assert info.input_size == (32, 32) and len(info.mean) == 3
    assert (
        info.config["loss"] == "ce+0.5*dice" and info.epoch == 1 and "miou" in info.metrics["val"]
    )
    with torch.no_grad():
        assert model(torch.randn(1, 3, 40, 50)).shape == (1, 3, 40, 50)


def test_a_checkpoint_from_before_the_fast_decoder_still_loads_as_published(tmp_path):
    # Metadata exactly as segcli wrote it before the default ResNet decoder became `fast`:
    # decoder_channels null meant the published decoder. Rebuilding with today's default would
    # not fit the weights.
    from segcli.checkpoint import CheckpointInfo, save_checkpoint
    from segcli.models import build_model

    torch.manual_seed(0)
    old = build_model("unet", "resnet18", 3, 2, decoder_channels="published").eval()
    legacy = {
        "arch": "unet",
        "backbone": "resnet18",
        "in_channels": 3,
        "classes": 2,
        "options": {
            "up": "transpose",
            "down": "maxpool",
            "attention": "none",
            "decoder_channels": None,
        },
    }
    info = CheckpointInfo(legacy, {"names": ["a", "b"]}, (32, 32), (0.5,) * 3, (0.5,) * 3)
    path = tmp_path / "old.safetensors"
    save_checkpoint(path, old, info)
    model, _ = load_model(path)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), old(x))


def test_resume_gives_the_same_weights_as_a_straight_run(tmp_path):
    # A step schedule does not depend on the total epoch count, so 2 + 2 epochs must retrace
    # 4 straight ones exactly: weights, optimizer moments, LR and data order.
    schedule = {"deterministic": True, "scheduler": "step", "step_size": 1, "gamma": 0.5}
    started = time.time()
    Trainer(fast_config(tmp_path / "a", epochs=4, **schedule)).run()
    assert not torch.are_deterministic_algorithms_enabled()  # handed back after the run
    Trainer(fast_config(tmp_path / "b", epochs=2, **schedule)).run()
    last = str(tmp_path / "b/run/last.safetensors")
    Trainer(fast_config(tmp_path / "b", epochs=4, resume=last, **schedule)).run()
    a = load_file(str(tmp_path / "a/run/last.safetensors"))
    b = load_file(str(tmp_path / "b/run/last.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    lines = (tmp_path / "b/run/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    # The resumed session's wall-clock continues the first one's instead of restarting at 0.
    walls = [json.loads(line)["wall_seconds"] for line in lines]
    assert walls == sorted(walls) and walls[2] > walls[1] > 0
    # Each line also says when its epoch ended, as Unix time (not a process-relative clock).
    ends = [json.loads(line)["ended_at"] for line in lines]
    assert ends == sorted(ends) and started <= ends[0] and ends[-1] <= time.time()


class SteppedClock:
    """time.perf_counter and time.time, moved on by `offset` seconds, so a test decides what
    each 32x32 epoch costs in wall-clock whatever the machine's speed."""

    def __init__(self) -> None:
        self.offset = 0.0

    def perf_counter(self) -> float:
        return time.perf_counter() + self.offset

    def time(self) -> float:
        return time.time() + self.offset


def trainer_clock(monkeypatch) -> SteppedClock:
    """The Trainer's clock, replaced by a SteppedClock for the test to move on."""
    import segcli.train.trainer as trainer_module

    clock = SteppedClock()
    monkeypatch.setattr(trainer_module, "time", clock)
    return clock


def timed_epochs(monkeypatch, costs: list[float]) -> list[bool]:
    """Make epoch k of the Trainer take costs[k] seconds of its clock; the returned list
    collects, per epoch, whether the weights moved."""
    clock = trainer_clock(monkeypatch)
    train_epoch = Trainer._train_epoch
    remaining = iter(costs)
    moved = []

    def timed_epoch(self, epoch, stop):
        clock.offset += next(remaining)
        before = [p.detach().clone() for p in self.model.parameters()]
        result = train_epoch(self, epoch, stop)
        after = list(self.model.parameters())
        moved.append(any(not torch.equal(a, b) for a, b in zip(after, before, strict=True)))
        return result

    monkeypatch.setattr(Trainer, "_train_epoch", timed_epoch)
    return moved


def test_time_limit_plans_the_epochs_that_fit_and_stops_within_it(tmp_path, monkeypatch):
    # Catches a time limit that is ignored (all 50 epochs run), one that overruns the budget,
    # a schedule left unplanned (the cosine would still be near its peak at the end), or a
    # progress line that counts to `--epochs` instead of the plan.
    timed_epochs(monkeypatch, [100.0] * 50)
    Trainer(fast_config(tmp_path, epochs=50, time_limit=10.0, previews=0)).run()
    lines = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert 4 <= len(records) <= 5  # 600 s at about 100 s an epoch
    assert records[-1]["wall_seconds"] <= 10 * 60
    state = load_training_state(tmp_path / "run/last.state.safetensors")
    assert state["planned_epochs"] == len(records)
    # The epoch lines and `seg runs` show the plan ("epoch 5/5"), not the 50 of `--epochs`.
    assert records[-1]["epochs"] == len(records)
    # The planned cosine ends with the run: the last epoch ends far below the peak lr (1e-3).
    assert records[-1]["lr"] < 0.2e-3


def test_time_limit_extends_a_run_whose_lr_has_annealed_with_an_epoch_that_learns(
    tmp_path, monkeypatch
):
    # Epochs of 90, 90 and 10 s under a 5-minute limit: after epoch 3 the 3-epoch cosine has
    # reached lr 0, and the last two epochs' cost (50 s) fits two more in the 110 s left;
    # epoch 4 then takes 100 s and the run stops within the limit. Catches a time limit that
    # leaves that time unused, an extra epoch run at lr 0 (its weights would not move), and
    # one that overruns the limit.
    moved = timed_epochs(monkeypatch, [90.0, 90.0, 10.0, 100.0])
    Trainer(fast_config(tmp_path, epochs=50, time_limit=5.0, previews=0)).run()
    lines = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["epochs"] for r in records] == [3, 3, 5, 4]
    assert records[2]["lr"] == 0.0
    assert moved == [True, True, True, True]
    assert records[-1]["wall_seconds"] <= 5 * 60


def test_time_limit_plans_at_the_recent_epoch_cost_after_a_slow_phase(tmp_path, monkeypatch):
    # Epochs of 40 s with one of 200 s (a busy host) under a limit of 500 s: at the recent
    # cost, 8 epochs fit (ending at 480 s). Catches planning at the session's mean cost,
    # which carries the slow epoch into every later plan and stops after 7 (at 440 s).
    timed_epochs(monkeypatch, [40.0, 200.0] + [40.0] * 10)
    Trainer(fast_config(tmp_path, epochs=50, time_limit=500 / 60, previews=0)).run()
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open()]
    assert len(records) == 8
    assert records[-1]["wall_seconds"] <= 500
    assert records[-1]["epochs"] == 8
    assert records[-1]["lr"] < 0.2e-3


@pytest.mark.parametrize(("limit_in_epochs", "planned"), [(1.5, 1), (2.5, 2)])
def test_time_limit_plans_within_the_first_epoch_from_its_first_steps(
    tmp_path, monkeypatch, limit_in_epochs, planned
):
    # Every training step takes 10 s of the Trainer's clock (12 steps an epoch: 120 s), and the
    # limit fits 1 or 2 epochs. Catches a first epoch run at the peak of a cosine planned over
    # `--epochs` until its end: a run that fits one epoch then stops with its lr at 1e-3, and
    # one that fits two halves its lr only in the second.
    import segcli.train.trainer as trainer_module

    clock = trainer_clock(monkeypatch)
    real_loss = trainer_module.compute_loss

    def ten_second_step(*args, **kwargs):
        clock.offset += 10.0
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "compute_loss", ten_second_step)
    limit = limit_in_epochs * 120
    config = fast_config(tmp_path, epochs=50, batch_size=2, time_limit=limit / 60, previews=0)
    Trainer(config).run()
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").open()]
    assert len(records) == planned
    assert records[-1]["wall_seconds"] <= limit
    assert records[-1]["lr"] == 0.0
    # The first epoch ends well down the planned cosine (0.61e-3 of two epochs), not at 1e-3.
    assert records[0]["lr"] <= 0.7e-3


def test_non_finite_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    Trainer(fast_config(tmp_path, epochs=1)).run()
    last = tmp_path / "run" / "last.safetensors"
    before = last.read_bytes()

    import segcli.train.trainer as trainer_module

    real = trainer_module.compute_loss

    def exploding(*args, **kwargs):
        return real(*args, **kwargs) * float("nan")

    monkeypatch.setattr(trainer_module, "compute_loss", exploding)
    with pytest.raises(RuntimeFailure, match=r"non-finite loss .* epoch 2 step 1"):
        Trainer(fast_config(tmp_path, epochs=3, resume=str(last))).run()
    assert last.read_bytes() == before
    read_checkpoint(last)


def test_sigint_leaves_a_resumable_state(tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "segcli",
        "train",
        "unet",
        "--backbone",
        "resnet18",
        "--epochs",
        "50",
        *FAST,
        "--out",
        str(out),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.5)
    assert (out / "metrics.jsonl").exists(), "no epoch finished in time"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert f"--resume {out / 'last.safetensors'}" in stderr
    state = out / "last.state.safetensors"
    assert state.is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "temporary files left"
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "segcli",
            "train",
            "--resume",
            str(out / "last.safetensors"),
            "--epochs",
            str(_epochs_done(out) + 1),
            "--workers",
            "0",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["epochs_run"] == _epochs_done(out)


def _epochs_done(out: Path) -> int:
    return len((out / "metrics.jsonl").read_text().splitlines())


def test_config_file_and_flags_merge_with_flags_winning(seg, tmp_path):
    config = tmp_path / "train.toml"
    config.write_text('epochs = 7\nlr = 0.01\nloss = "dice+ce"\n[model_options]\nup = "bilinear"\n')
    result = seg("train", "unet", "--config", str(config), "--lr", "0.5", "--print-config")
    assert result.returncode == 0, result.stderr
    assert "epochs = 7" in result.stdout and "lr = 0.5" in result.stdout
    assert 'loss = "dice+ce"' in result.stdout and 'up = "bilinear"' in result.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["train", "nope"], "unknown architecture"),
        (["train", "unet", "--optimizer", "lion"], "lion"),
        (["train", "unet", "--loss", "hinge"], "hinge"),
        (["train", "unet", "--data", "/no/such/dir"], "/no/such/dir"),
        (["train", "unet", "--epochs", "0"], "--epochs"),
        (["train", "unet", "--time-limit", "0"], "--time-limit"),
        (["train", "unet", "--scheduler", "poly", "--power", "0"], "--power"),
        (["train", "unet", "--lr", "0.001", "--min-lr", "0.01"], "--min-lr"),
        (["train", "unet", "--min-lr", "-1"], "--min-lr"),
        (["train", "unet", "--decoder-channels", "256,128"], "--decoder-channels"),
        (["train", "unet", "--config", "/no/such.toml"], "such.toml"),
        (["train", "unet", "--crop", "300"], "--crop 300 is larger than"),
        (["train", "unet", "--crop", "128", "--scale", "0.5"], "--crop 128 is larger than"),
        (["train", "unet", "--crop", "64", "--scale", "0"], "--scale 0"),
        (["train", "unet", "--crop", "64", "--scale", "-1"], "--scale -1"),
        (["train", "unet", "--scale", "0.5"], "add --crop"),
        (["eval", "/no/such.safetensors", "--batch-size", "2"], "no such checkpoint"),
    ],
)
def test_bad_input_exits_2_with_one_line(seg, args, fragment):
    result = seg(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr


def test_patch_training_stores_its_scale_and_eval_follows_it_with_no_flag(seg, tmp_path):
    """--crop/--scale: the checkpoint says `patches` at 0.5x, and `seg eval` with no flag
    slides 48-pixel windows over each halved image and reproduces training's own val score
    (both go through the one inference path); a resize-policy run would score differently."""
    from segcli.checkpoint import read_checkpoint

    out = tmp_path / "run"
    common = ["--workers", "0", "--device", "cpu", "--amp", "off", "--json"]
    trained = seg(
        "train", "unet", "--backbone", "resnet18", "--crop", "48", "--scale", "0.5",
        "--epochs", "1", "--batch-size", "4", "--previews", "1", "--out", str(out), *common,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    spec = read_checkpoint(out / "best.safetensors")[1].spec
    assert (spec.policy, spec.size, spec.scale) == ("patches", (48, 48), 0.5)
    evaluated = seg("eval", str(out / "best.safetensors"), *common)
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert report["full_res"] is True
    assert report["miou"] == pytest.approx(json.loads(trained.stdout)["val"]["miou"], abs=1e-6)
    assert (out / "preview_0.png").is_file()


def test_a_file_that_is_not_a_checkpoint_exits_2(seg, tmp_path):
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"not a checkpoint at all")
    result = seg("eval", str(bogus))
    assert result.returncode == 2
    assert "not a safetensors checkpoint" in result.stderr


def test_ddp_with_two_processes_matches_its_own_single_process_eval(tmp_path):
    # 7 val images over 2 ranks: sharding with padding (a DistributedSampler) would score one
    # image twice, so the all-reduced matrix would differ from one process scoring the split.
    from segcli.data.mock import generate

    data = generate(tmp_path / "data", splits={"train": 16, "val": 7})
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "-m",
            "segcli",
            "train",
            "unet",
            "--backbone",
            "resnet18",
            "--epochs",
            "1",
            *FAST,
            "--data",
            str(data),
            "--out",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    evaluated = subprocess.run(
        [
            sys.executable,
            "-m",
            "segcli",
            "eval",
            str(out / "best.safetensors"),
            "--data",
            str(data),
            "--workers",
            "0",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    scores = json.loads(evaluated.stdout)
    # Validation was sharded over two ranks and its confusion matrix all-reduced: it must
    # equal one process scoring the whole split.
    assert scores["miou"] == pytest.approx(summary["val"]["miou"], abs=1e-12)
    assert scores["iou"] == pytest.approx(summary["val"]["iou"], abs=1e-12)
    assert scores["pixel_acc"] == pytest.approx(summary["val"]["pixel_acc"], abs=1e-12)


def test_resuming_a_finished_run_asks_for_more_epochs(tmp_path):
    Trainer(fast_config(tmp_path, epochs=1)).run()
    with pytest.raises(UsageError, match="raise `epochs`"):
        Trainer(
            fast_config(tmp_path, epochs=1, resume=str(tmp_path / "run/last.safetensors"))
        ).run()


def test_resume_needs_neither_the_network_nor_the_backbone_weights_file(tmp_path, monkeypatch):
    # Catches a resume that rebuilds the backbone from its original source: the deleted
    # --backbone-weights file (exit 2) or torchvision's download (fails offline).
    from torchvision.models import resnet18

    weights = tmp_path / "r18.pth"
    torch.save(resnet18().state_dict(), weights)
    Trainer(fast_config(tmp_path, backbone_weights=str(weights), previews=0)).run()
    weights.unlink()
    import segcli.models.encoders as encoders

    def offline(*args, **kwargs):
        raise AssertionError("resume fetched backbone weights")

    monkeypatch.setattr(encoders, "_load_backbone_weights", offline)
    last = str(tmp_path / "run/last.safetensors")
    for pretrained in (False, True):  # as if the run had been started with --pretrained
        config = fast_config(tmp_path, epochs=2 + pretrained, resume=last, previews=0)
        config.pretrained, config.backbone_weights = pretrained, str(weights)
        Trainer(config).run()
    assert len((tmp_path / "run/metrics.jsonl").read_text().splitlines()) == 3


def test_resume_refuses_weights_and_state_of_different_epochs(tmp_path):
    # Catches a resume that pairs epoch-2 optimizer moments with epoch-1 weights (a crash
    # between the two writes): it must refuse, naming both files.
    Trainer(fast_config(tmp_path, epochs=1, previews=0)).run()
    run = tmp_path / "run"
    older = (run / "last.safetensors").read_bytes()
    Trainer(fast_config(tmp_path, epochs=2, resume=str(run / "last.safetensors"))).run()
    (run / "last.safetensors").write_bytes(older)
    with pytest.raises(UsageError, match="not a pair") as error:
        Trainer(fast_config(tmp_path, epochs=3, resume=str(run / "last.safetensors"))).run()
    assert "last.safetensors" in str(error.value) and "last.state.safetensors" in str(error.value)


def test_resume_refuses_the_weights_of_another_run_at_the_same_epoch(tmp_path):
    # Catches a pairing check by epoch number alone: a last.safetensors copied from another run
    # (same epoch, other weights) would resume with moments that belong to different weights.
    Trainer(fast_config(tmp_path, epochs=1, previews=0, out=str(tmp_path / "other"))).run()
    Trainer(fast_config(tmp_path, epochs=1, previews=0, seed=1)).run()
    run = tmp_path / "run"
    (run / "last.safetensors").write_bytes((tmp_path / "other/last.safetensors").read_bytes())
    with pytest.raises(UsageError, match="not a pair"):
        Trainer(fast_config(tmp_path, epochs=2, resume=str(run / "last.safetensors"))).run()


def test_best_checkpoint_keeps_the_best_epoch_while_last_moves_on(tmp_path, monkeypatch):
    # Catches best.safetensors sharing storage with last.safetensors in a way a later epoch's
    # write reaches (a link to a file then rewritten in place): best must stay epoch 1 here,
    # where val mIoU is made to fall after it.
    import segcli.train.trainer as trainer_module

    evaluate, calls = trainer_module.evaluate, []

    def falling_miou(*args, **kwargs):
        result = evaluate(*args, **kwargs)
        calls.append(1)
        result.metrics["miou"] = 1.0 / len(calls)
        return result

    monkeypatch.setattr(trainer_module, "evaluate", falling_miou)
    Trainer(fast_config(tmp_path, epochs=3, previews=0)).run()
    best_weights, best = read_checkpoint(tmp_path / "run/best.safetensors")
    last_weights, last = read_checkpoint(tmp_path / "run/last.safetensors")
    assert (best.epoch, last.epoch) == (1, 3)
    assert any(not torch.equal(best_weights[k], last_weights[k]) for k in best_weights)


@pytest.mark.parametrize("arch", ["pspnet", "deeplabv3"])
def test_models_that_cannot_train_on_one_image_refuse_batch_size_1(seg, arch):
    # A BatchNorm after global pooling cannot normalise one value: it used to end in a
    # traceback after data loading; now one line naming the flag, before any training.
    result = seg("train", arch, "--backbone", "resnet18", *FAST, "--batch-size", "1")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--batch-size" in lines[0] and "at least 2" in lines[0]


def test_ddp_refuses_a_batch_larger_than_each_ranks_shard(tmp_path, monkeypatch):
    # 24 mock training images over 2 ranks are 12 per rank: batch 16 would give zero steps and
    # a scheduler error; it must be one line naming --batch-size, the shard and the world size.
    import segcli.train.trainer as trainer_module
    from segcli.train.distributed import DistContext

    monkeypatch.setattr(trainer_module, "init_distributed", lambda device: DistContext(0, 2, 0))
    with pytest.raises(UsageError, match=r"`batch_size` 16 .* shard of 12 .* 2 processes"):
        Trainer(fast_config(tmp_path, batch_size=16)).run()


DDP_NAN_SCRIPT = """
import os, sys
import segcli.train.trainer as trainer
from segcli.train.config import TrainConfig
from segcli.errors import SegError

if os.environ["RANK"] == "1":  # a NaN on rank 1 only, from its first step of epoch 2
    real, calls = trainer.compute_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) > 3 else loss

    trainer.compute_loss = poisoned
config = TrainConfig(arch="unet", backbone="resnet18", size="32", epochs=3, batch_size=4,
                     workers=0, previews=0, out=sys.argv[1])
try:
    trainer.Trainer(config).run()
except SegError as error:
    print(error, file=sys.stderr)
    sys.exit(error.exit_code)
"""


def test_ddp_nan_on_one_rank_stops_every_rank_and_keeps_the_checkpoint(tmp_path):
    # Without the all-reduced stop flags rank 1 exits alone and rank 0 waits for it in the
    # next gradient all-reduce until gloo's 30-minute timeout.
    script = tmp_path / "ddp_nan.py"
    script.write_text(DDP_NAN_SCRIPT)
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = "29531"
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(out)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        codes = [rank.wait(timeout=120) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    errors = [rank.stderr.read() for rank in ranks]
    assert codes == [1, 1], errors
    assert "non-finite loss" in errors[0] and "epoch 2 step 1" in errors[0]
    _, info = read_checkpoint(out / "last.safetensors")
    assert info.epoch == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


def test_patience_stops_when_val_miou_stops_improving(tmp_path):
    # Catches --patience ignored (all 5 epochs run) or counted from the wrong epoch: with a
    # learning rate too small to change any prediction, epoch 1 sets the best and epoch 2 is
    # the one epoch without a gain that patience 1 allows.
    summary = Trainer(fast_config(tmp_path, epochs=5, lr=1e-12, patience=1)).run()
    assert summary["stopped_early"] and summary["epochs_run"] == 2
    assert summary["best_epoch"] == 1


def test_power_and_min_lr_shape_the_schedule_training_follows(tmp_path):
    # Catches --power or --min-lr accepted but not passed to the schedule: halfway through a
    # poly schedule the lr is min_lr + (lr - min_lr) * 0.5 ** power (power 2: 0.25 of the
    # span; the default 0.9 would give 0.54), and the last epoch ends at min_lr, not 0.
    lr, min_lr = 1e-2, 1e-4
    config = fast_config(tmp_path, epochs=2, scheduler="poly", lr=lr, power=2.0, min_lr=min_lr)
    Trainer(config).run()
    lines = (tmp_path / "run/metrics.jsonl").read_text().splitlines()
    recorded = [json.loads(line)["lr"] for line in lines]
    assert recorded == pytest.approx([min_lr + (lr - min_lr) * 0.25, min_lr])


def test_clip_grad_bounds_the_update(tmp_path):
    # Catches --clip-grad accepted but not applied: plain SGD (no momentum, no weight decay)
    # moves each weight by lr x its gradient, so a 1e-9 norm bound leaves the weights within
    # lr x 1e-9 per step of where they started, while the unclipped run moves them.
    common = {"optimizer": "sgd", "momentum": 0.0, "weight_decay": 0.0, "lr": 0.1}
    common |= {"scheduler": "none", "deterministic": True}
    Trainer(fast_config(tmp_path / "free", **common)).run()
    Trainer(fast_config(tmp_path / "clipped", clip_grad=1e-9, **common)).run()
    from segcli.models import build_model

    def moved(run: str) -> float:
        weights = load_file(str(tmp_path / run / "run/last.safetensors"))
        torch.manual_seed(0)
        initial = build_model("unet", "resnet18", 3, 3).state_dict()
        key = (
            "head.conv.weight"
            if "head.conv.weight" in weights
            else next(k for k in weights if k.startswith("head") and k.endswith("weight"))
        )
        return float((weights[key] - initial[key].reshape(weights[key].shape)).abs().max())

    assert moved("clipped") < 1e-8 < moved("free")


def test_binary_masks_train_a_one_logit_model(tmp_path, seg):
    # Catches the binary path broken inside the Trainer (two logits, a softmax loss, or
    # 0/255 masks read as 256 classes): masks of 0 and 255 train a one-logit sigmoid model
    # scored as two classes, and eval reads it back the same way.
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 3)):
        for index in range(count):
            mask = np.zeros((40, 40), np.uint8)
            mask[10:30, 5 + index : 25 + index] = 255
            pixels = rng.integers(0, 60, (40, 40, 3), dtype=np.uint8) + (mask[..., None] // 2)
            for kind, array in (("images", pixels), ("masks", mask)):
                (tmp_path / "data" / split / kind).mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(tmp_path / "data" / split / kind / f"{index}.png")
    summary = Trainer(
        fast_config(tmp_path, data=str(tmp_path / "data"), epochs=2, batch_size=4)
    ).run()
    _, info = load_model(tmp_path / "run" / "best.safetensors")
    assert info.model["classes"] == 1 and info.binary
    assert (
        summary["class_names"] == ["background", "foreground"] and len(summary["val"]["iou"]) == 2
    )
    scored = seg(
        "eval",
        str(tmp_path / "run/best.safetensors"),
        "--data",
        str(tmp_path / "data"),
        "--workers",
        "0",
        "--json",
    )
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["miou"] == pytest.approx(summary["val"]["miou"], abs=1e-9)


def test_class_weights_auto_uses_the_training_masks_median_frequencies(tmp_path):
    # Catches --class-weights auto computed from the wrong split, from resized masks, or not
    # reaching the loss: the weighted CE's weights must be median(freq) / freq of the pixels
    # of the training masks on disk, counted here with numpy.
    import numpy as np
    from PIL import Image

    from segcli.data import mock_root

    trainer = Trainer(fast_config(tmp_path, loss="wce", class_weights="auto"))
    trainer.run()
    counts = np.zeros(3)
    for path in sorted((mock_root() / "train" / "masks").iterdir()):
        values = np.asarray(Image.open(path)).ravel()
        counts += np.bincount(values[values != 255], minlength=3)[:3]
    frequencies = counts / counts.sum()
    expected = np.median(frequencies) / frequencies
    (term,) = trainer.criterion.terms
    assert term.weights.tolist() == pytest.approx(expected.tolist(), rel=1e-6)  # float32
