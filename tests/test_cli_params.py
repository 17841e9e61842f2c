"""`seg params` and the CLI basics, run as a user runs them."""

import json
import subprocess
import sys

from tests.test_models_unet_family import SPEC_COUNTS


def test_table_reproduces_the_published_counts(seg):
    result = seg("params", "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    published = {row["backbone"]: row["params"] for row in rows[:6]}
    assert published == SPEC_COUNTS
    assert [row["name"] for row in rows[:6]] == [
        "UNet",
        "ResUNet18",
        "ResUNet34",
        "ResUNet50",
        "ResUNet101",
        "ResUNet152",
    ]
    assert {"unetpp", "unet3p"} <= {row["arch"] for row in rows}


def test_table_prints_millions_with_two_decimals(seg):
    result = seg("params")
    assert result.returncode == 0
    for text in ("31,036,672", "31.04M", "20.78M", "30.89M", "40.90M", "59.89M", "75.54M"):
        assert text in result.stdout


def test_one_model_with_flops(seg):
    result = seg(
        "params",
        "unet3p",
        "--backbone",
        "resnet34",
        "--classes",
        "3",
        "--in-channels",
        "1",
        "--flops",
        "--size",
        "64x96",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(result.stdout)
    assert (row["arch"], row["backbone"], row["classes"], row["in_channels"]) == (
        "unet3p",
        "resnet34",
        3,
        1,
    )
    assert row["gflops"] > 0


def test_usage_errors_exit_2_with_one_line(seg):
    for args in (
        ["params", "nope"],
        ["params", "unet", "--backbone", "resnet9"],
        ["params", "unet", "--backbone", "resnet18", "--down", "conv"],
        ["params", "--flops", "--size", "big"],
        ["params", "--no-such-flag"],
        ["no-such-command"],
    ):
        result = seg(*args)
        assert result.returncode == 2, args
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("seg: error:"), result.stderr


def test_unknown_backbone_message_lists_the_valid_ones(seg):
    result = seg("params", "unet", "--backbone", "resnet9")
    assert "resnet34" in result.stderr and "vgg16_bn" in result.stderr


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from segcli.cli import app\n"
        "try:\n"
        "    app(['--help'], standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert 'torch' not in sys.modules, 'seg --help imported torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "params" in result.stdout


def test_a_missing_dependency_is_one_line_not_a_traceback():
    # segcli installed without its dependencies (`pip install --no-deps`, as once happened to
    # the system Python here): catches `seg --help` dying with a ModuleNotFoundError traceback.
    code = (
        "import sys\n"
        "sys.modules['typer'] = None  # import typer now fails as if it were not installed\n"
        "sys.argv = ['seg', '--help']\n"
        "from segcli.__main__ import main\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("seg: error: the Python package typer is not installed in ")


def test_every_registry_option_is_a_flag_and_every_flag_an_option():
    # One list of option names for `seg train` and `seg params`: an architecture option the
    # commands forget (or a flag no architecture takes) is caught here.
    from segcli.cli._options import MODEL_OPTION_NAMES
    from segcli.models.registry import MODELS

    weights = {"pretrained", "backbone_weights"}  # separate flags with their own checks
    registry = {name for entry in MODELS.values() for name in entry.options} - weights
    assert registry == set(MODEL_OPTION_NAMES)


def test_output_stride_is_one_option_for_every_dilated_resnet(seg):
    # fcn on ResNet used to refuse --output-stride ("fcn has no option output_stride").
    for arch, backbone in (("deeplabv3", "resnet50"), ("pspnet", "resnet50"), ("fcn", "resnet50")):
        done = seg("params", arch, "--backbone", backbone, "--output-stride", "16", "--json")
        assert done.returncode == 0, done.stderr
    from segcli.models import build_model

    model = build_model("fcn", "resnet50", output_stride=16)
    assert model.encoder.reductions[-1] == 16


def test_train_help_shows_every_default_as_train_config_holds_it(seg, monkeypatch):
    # Catches a `--help` default written by hand that drifted from the TrainConfig value the
    # run really uses (the two used to be kept separately), a setting whose help hides it,
    # and Markdown eating the `*` of ce+0.5*dice.
    import dataclasses
    import inspect

    from segcli.cli.train import train
    from segcli.train.config import TrainConfig

    monkeypatch.setenv("COLUMNS", "300")
    text = seg("train", "--help").stdout
    flags = set(inspect.signature(train).parameters)
    checked = 0
    for field in dataclasses.fields(TrainConfig):
        default = field.default
        if (
            field.name not in flags
            or field.name == "arch"
            or default in (None, dataclasses.MISSING)
        ):
            continue
        if isinstance(default, bool):
            shown = "on" if default else "off"
        else:
            shown = f"{default:g}" if isinstance(default, float) else str(default)
        flag = "--" + field.name.replace("_", "-")
        line = next(line for line in text.splitlines() if f" {flag} " in line)
        assert f"[{shown}" in line, (flag, shown, line)
        checked += 1
    assert checked >= 30
