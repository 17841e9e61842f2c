"""What one optimizer step is made of (gradient accumulation), and the settings a resumed run
is made of (its own config, a TOML file and flags), on the bundled mock data at 32x32."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from torch import nn

import segcli.models
from segcli.train.config import TrainConfig
from segcli.train.trainer import Trainer


def _batchnorm_to_groupnorm(module: nn.Module) -> nn.Module:
    """BatchNorm makes a batch of 4 differ from two batches of 2 by construction; GroupNorm
    normalises each image alone, so only the accumulation is left to compare."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.GroupNorm(1, child.num_features))
        else:
            _batchnorm_to_groupnorm(child)
    return module


def test_two_accumulated_batches_of_2_make_the_update_of_one_batch_of_4(tmp_path, monkeypatch):
    # Catches --accum-steps that steps the optimizer after every micro-batch, forgets to divide
    # the loss by the number of micro-batches (twice the update), or drops a micro-batch's
    # gradient (zero_grad in the wrong place): each gives weights far from the batch-4 run's.
    build = segcli.models.build_model
    monkeypatch.setattr(
        segcli.models,
        "build_model",
        lambda *args, **kwargs: _batchnorm_to_groupnorm(build(*args, **kwargs)),
    )
    # CE only: it is a mean over pixels, which two equal halves average exactly; the soft Dice
    # of a batch is not the mean of its halves' Dice. No augmentation: the zoom pads with
    # ignored pixels, which would make the halves' pixel counts differ.
    common = {
        "arch": "unet",
        "backbone": "resnet18",
        "size": "32",
        "epochs": 1,
        "workers": 0,
        "previews": 0,
        "loss": "ce",
        "augment": False,
        "optimizer": "sgd",
        "momentum": 0.0,
        "weight_decay": 0.0,
        "lr": 0.5,
        "scheduler": "none",
        "deterministic": True,
        "amp": "off",  # fp32: bf16 (auto on hosts with native bf16) rounds beyond the tolerance
    }
    runs = {
        "batch4": {"batch_size": 4, "accum_steps": 1},
        "accum": {"batch_size": 2, "accum_steps": 2},
        "batch2": {"batch_size": 2, "accum_steps": 1},
    }
    weights = {}
    for name, settings in runs.items():
        Trainer(TrainConfig(out=str(tmp_path / name), **common, **settings)).run()
        weights[name] = load_file(str(tmp_path / name / "last.safetensors"))
    floating = [key for key, value in weights["batch4"].items() if value.is_floating_point()]
    gap = max(float((weights["accum"][k] - weights["batch4"][k]).abs().max()) for k in floating)
    # The same data in a different step structure moves the weights by far more: the check
    # can tell a wrong accumulation from float rounding.
    plain = max(float((weights["batch2"][k] - weights["batch4"][k]).abs().max()) for k in floating)
    assert gap < 1e-4 < plain / 100


@pytest.fixture
def first_epoch(tmp_path, seg) -> tuple[Path, Path]:
    """One finished epoch started from a TOML file, and the file."""
    config = tmp_path / "start.toml"
    config.write_text(
        'epochs = 1\nlr = 0.01\nloss = "dice+ce"\nsize = "32"\nbatch_size = 8\nworkers = 0\n'
        'previews = 0\n[model_options]\nup = "bilinear"\n'
    )
    run = tmp_path / "run"
    result = seg("train", "unet", "--config", str(config), "--out", str(run), "--json")
    assert result.returncode == 0, result.stderr
    return run, config


def test_resume_merges_the_run_then_a_toml_file_then_flags(first_epoch, tmp_path, seg):
    # Catches a resume that drops the run's own settings for the defaults (lr 1e-3, loss
    # ce+0.5*dice, transposed upsampling: a different model), or lets the run's settings
    # override what the user gives now (the TOML's lr, the flag's epochs).
    run, _ = first_epoch
    later = tmp_path / "later.toml"
    later.write_text("lr = 0.02\nepochs = 3\n")
    resume = ["train", "unet", "--resume", str(run / "last.safetensors"), "--config", str(later)]
    shown = seg(*resume, "--epochs", "2", "--print-config")
    assert shown.returncode == 0, shown.stderr
    assert "lr = 0.02" in shown.stdout  # TOML over the run
    assert "epochs = 2" in shown.stdout  # the flag over the TOML
    assert 'loss = "dice+ce"' in shown.stdout and 'up = "bilinear"' in shown.stdout  # the run's
    result = seg(*resume, "--epochs", "2", "--json")
    assert result.returncode == 0, result.stderr
    records = (run / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 2  # epoch 2 continued the run; epoch 1 was not trained again


def test_resume_refuses_a_change_of_model_with_one_line(first_epoch, seg):
    # Catches a resume that silently builds another model (here transposed upsampling) and then
    # fails on a state-dict mismatch with a traceback, or trains new weights under the old run.
    run, _ = first_epoch
    result = seg(
        "train",
        "unet",
        "--resume",
        str(run / "last.safetensors"),
        "--epochs",
        "2",
        "--up",
        "transpose",
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "--up" in result.stderr


def test_sync_bn_on_cpu_ranks_refuses_before_any_work(tmp_path, monkeypatch):
    # The fast form of the 2-process test below: rank 0 of a world of 2 on CPU refuses
    # --sync-bn (PyTorch's SyncBatchNorm has no CPU path) before writing anything.
    import segcli.train.trainer as trainer_module
    from segcli.errors import UsageError
    from segcli.train.distributed import DistContext

    monkeypatch.setattr(trainer_module, "init_distributed", lambda device: DistContext(0, 2, 0))
    out = tmp_path / "run"
    config = TrainConfig(arch="unet", size="32", epochs=1, workers=0, sync_bn=True, out=str(out))
    with pytest.raises(UsageError, match="`sync_bn` needs CUDA devices"):
        Trainer(config).run()
    assert not (out / "last.safetensors").exists()


@pytest.mark.slow
def test_sync_bn_on_two_cpu_processes_refuses_before_training(tmp_path):
    # Catches --sync-bn on CPU ranks reaching PyTorch's SyncBatchNorm, which has no CPU path:
    # a traceback from every rank mid-epoch instead of one line and exit 2 before any work.
    from segcli.data.mock import generate

    data = generate(tmp_path / "data", splits={"train": 8, "val": 3})
    out = tmp_path / "ddp"
    result = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", "29531", "-m", "segcli", "train", "unet", "--backbone", "resnet18",
            "--sync-bn", "--epochs", "1", "--size", "32", "--batch-size", "2", "--workers", "0",
            "--data", str(data), "--out", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("seg: error:")]
    assert errors and all("--sync-bn" in line and "CUDA" in line for line in errors)
    # torchrun reports a failed child with its own traceback; none may come from segcli's code.
    assert "segcli/train" not in result.stderr and "segcli/models" not in result.stderr
    assert not (out / "last.safetensors").exists()


def test_training_into_a_folder_that_holds_a_run_refuses_or_replaces_it(first_epoch, seg):
    # Catches a second `seg train --out RUN` silently replacing the first run's checkpoints
    # while appending its epochs to the same metrics.jsonl (lost work and mixed curves), and
    # an --overwrite that leaves the old run's records behind.
    run, config = first_epoch
    before = {name: (run / name).read_bytes() for name in ("best.safetensors", "metrics.jsonl")}
    again = ["train", "unet", "--config", str(config), "--out", str(run)]
    refused = seg(*again)
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1
    assert "--resume" in refused.stderr and "--overwrite" in refused.stderr
    assert {name: (run / name).read_bytes() for name in before} == before
    replaced = seg(*again, "--overwrite", "--seed", "1")
    assert replaced.returncode == 0, replaced.stderr
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1
    assert (run / "best.safetensors").read_bytes() != before["best.safetensors"]
    assert "overwrite" not in (run / "config.toml").read_text()  # reusing it replaces nothing
