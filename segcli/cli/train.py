"""`seg train ARCH`: train a model; every flag may also come from `--config FILE.toml`."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from segcli.cli._options import (
    MODEL_OPTION_NAMES,
    Attention,
    Aux,
    Backbone,
    Cgm,
    DataFormat,
    DecoderChannels,
    DeepSupervision,
    Down,
    FcWidth,
    IgnoreValues,
    Json,
    OutputStride,
    ReduceZeroLabel,
    Stride,
    Up,
)
from segcli.train.config import TrainConfig

OPT = "Optimisation"
DATA = "Data"
RUN = "Execution"
OUT = "Output"


def _opt(help: str, panel: str, *names: str, setting: str | None = None) -> typer.models.OptionInfo:
    """An option whose help shows, in place of `{default}`, the default of TrainConfig's field
    `setting`: defaults are written once, in TrainConfig. (The options themselves default to
    None so that a TOML file and `--resume` can tell a flag given from one left out.)"""
    if setting is not None:
        # The help is rendered as Markdown, where `*` (as in ce+0.5*dice) would be emphasis.
        help = help.format(default=shown_default(setting).replace("*", "\\*"))
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=False)


def shown_default(setting: str) -> str:
    """TrainConfig's default for `setting` as `--help` shows it: on/off for switches."""
    value = TrainConfig.__dataclass_fields__[setting].default
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def train(
    arch: Annotated[str | None, typer.Argument(help="Architecture, e.g. unet, unet3p.")] = None,
    backbone: Backbone = None,
    up: Up = None,
    down: Down = None,
    attention: Attention = None,
    deep_supervision: DeepSupervision = None,
    cgm: Cgm = None,
    output_stride: OutputStride = None,
    aux: Aux = None,
    stride: Stride = None,
    fc_width: FcWidth = None,
    decoder_channels: DecoderChannels = None,
    pretrained: Annotated[
        bool | None,
        _opt(
            "ImageNet weights for the backbone [{default}].",
            "Model",
            "--pretrained/--no-pretrained",
            setting="pretrained",
        ),
    ] = None,
    backbone_weights: Annotated[
        str | None, _opt("Backbone weights from a local file.", "Model")
    ] = None,
    data: Annotated[str | None, _opt("Dataset folder [default: bundled mock data].", DATA)] = None,
    classes_file: Annotated[str | None, _opt("Class table (names, colours).", DATA)] = None,
    format: DataFormat = None,
    foreground: Annotated[
        int | None, _opt("Raw mask value that is foreground in binary masks.", DATA)
    ] = None,
    ignore_values: IgnoreValues = None,
    reduce_zero_label: ReduceZeroLabel = None,
    val_fraction: Annotated[
        float | None,
        _opt(
            "Without a val split: the fraction of train held out as val, by --seed, saved to "
            "the run's split.json [{default}].",
            DATA,
            setting="val_fraction",
        ),
    ] = None,
    folds: Annotated[
        int | None,
        _opt(
            "K-fold cross-validation over train and val pooled; without --fold, every fold in "
            "turn into RUN/fold_I/.",
            DATA,
        ),
    ] = None,
    fold: Annotated[int | None, _opt("With --folds: the one fold to train, 0..K-1.", DATA)] = None,
    in_channels: Annotated[
        int | None, _opt("Input channels [{default}].", DATA, setting="in_channels")
    ] = None,
    size: Annotated[
        str | None, _opt("Training size N or HxW [{default}].", DATA, setting="size")
    ] = None,
    crop: Annotated[
        int | None,
        _opt(
            "Train on random N x N patches at native resolution instead of whole images "
            "resized to --size; eval and predict then slide N-pixel windows at that scale.",
            DATA,
        ),
    ] = None,
    scale: Annotated[
        float | None,
        _opt("With --crop: resize images by this factor first [{default}].", DATA, setting="scale"),
    ] = None,
    augment: Annotated[
        bool | None,
        _opt("Augmentation on/off [{default}].", DATA, "--augment/--no-augment", setting="augment"),
    ] = None,
    zoom: Annotated[
        str | None,
        _opt(
            "Scale jitter LOW,HIGH: resize by a random factor, then crop to --size "
            "[{default}; 1,1: off].",
            DATA,
            setting="zoom",
        ),
    ] = None,
    scale_min: Annotated[
        float | None,
        _opt("Random resized crop of this smallest area instead of --zoom [off].", DATA),
    ] = None,
    hflip: Annotated[
        bool | None,
        _opt("Horizontal flips [{default}].", DATA, "--hflip/--no-hflip", setting="hflip"),
    ] = None,
    vflip: Annotated[
        bool | None,
        _opt("Vertical flips [{default}].", DATA, "--vflip/--no-vflip", setting="vflip"),
    ] = None,
    rotate: Annotated[
        float | None,
        _opt("Max rotation in degrees, 0 for none [{default}].", DATA, setting="rotate"),
    ] = None,
    color_jitter: Annotated[
        float | None,
        _opt("Colour jitter strength, 0 for none [{default}].", DATA, setting="color_jitter"),
    ] = None,
    workers: Annotated[
        int | None, _opt("DataLoader workers [auto: 0 on a CPU of <=4 cores, else 2].", DATA)
    ] = None,
    epochs: Annotated[int | None, _opt("Epochs [{default}].", OPT, setting="epochs")] = None,
    batch_size: Annotated[
        int | None, _opt("Batch size [{default}].", OPT, setting="batch_size")
    ] = None,
    lr: Annotated[float | None, _opt("Learning rate [{default}].", OPT, setting="lr")] = None,
    loss: Annotated[
        str | None,
        _opt("Loss, e.g. ce, dice+ce, 0.5\\*focal+dice [{default}].", OPT, setting="loss"),
    ] = None,
    class_weights: Annotated[str | None, _opt("wce weights: 1,2,5 or auto.", OPT)] = None,
    focal_gamma: Annotated[
        float | None, _opt("Focal gamma [{default}].", OPT, setting="focal_gamma")
    ] = None,
    focal_alpha: Annotated[float | None, _opt("Focal alpha.", OPT)] = None,
    tversky_alpha: Annotated[
        float | None, _opt("Tversky alpha [{default}].", OPT, setting="tversky_alpha")
    ] = None,
    tversky_beta: Annotated[
        float | None, _opt("Tversky beta [{default}].", OPT, setting="tversky_beta")
    ] = None,
    dice_background: Annotated[
        bool | None,
        _opt(
            "Dice counts background [{default}].",
            OPT,
            "--dice-background/--no-dice-background",
            setting="dice_background",
        ),
    ] = None,
    optimizer: Annotated[
        str | None, _opt("sgd | adam | adamw | rmsprop [{default}].", OPT, setting="optimizer")
    ] = None,
    weight_decay: Annotated[
        float | None,
        _opt("Weight decay, not on norms/biases [{default}].", OPT, setting="weight_decay"),
    ] = None,
    momentum: Annotated[
        float | None, _opt("Momentum (sgd, rmsprop) [{default}].", OPT, setting="momentum")
    ] = None,
    nesterov: Annotated[
        bool | None,
        _opt(
            "Nesterov momentum (sgd) [{default}].",
            OPT,
            "--nesterov/--no-nesterov",
            setting="nesterov",
        ),
    ] = None,
    scheduler: Annotated[
        str | None,
        _opt("step | poly | cosine | plateau | none [{default}].", OPT, setting="scheduler"),
    ] = None,
    warmup_epochs: Annotated[
        float | None, _opt("Linear warm-up epochs [{default}].", OPT, setting="warmup_epochs")
    ] = None,
    step_size: Annotated[
        int | None, _opt("step: epochs per decay [{default}].", OPT, setting="step_size")
    ] = None,
    gamma: Annotated[
        float | None, _opt("step: decay factor [{default}].", OPT, setting="gamma")
    ] = None,
    power: Annotated[
        float | None, _opt("poly: exponent of (1 - t) [{default}].", OPT, setting="power")
    ] = None,
    min_lr: Annotated[
        float | None,
        _opt(
            "The lr poly and cosine decay to, the floor of step and plateau [{default}].",
            OPT,
            setting="min_lr",
        ),
    ] = None,
    aux_weight: Annotated[float | None, _opt("Weight of auxiliary losses [per arch].", OPT)] = None,
    accum_steps: Annotated[
        int | None, _opt("Gradient accumulation steps [{default}].", OPT, setting="accum_steps")
    ] = None,
    clip_grad: Annotated[float | None, _opt("Clip gradient norm to this.", OPT)] = None,
    ema: Annotated[
        float | None,
        _opt(
            "Validate and save an exponential moving average of the weights with this decay "
            "(warmed up over the first steps); 0 for the raw weights [{default}].",
            OPT,
            setting="ema",
        ),
    ] = None,
    patience: Annotated[
        int | None,
        _opt(
            "Early stop after N epochs without gain, 0 for never [{default}].",
            OPT,
            setting="patience",
        ),
    ] = None,
    time_limit: Annotated[
        float | None,
        _opt(
            "Wall-clock budget in minutes: plans the epochs that fit (at most --epochs) and "
            "ends the poly/cosine schedule there.",
            OPT,
        ),
    ] = None,
    device: Annotated[
        str | None, _opt("auto | cpu | cuda | mps [{default}].", RUN, setting="device")
    ] = None,
    amp: Annotated[
        str | None, _opt("auto | bf16 | fp16 | off [{default}].", RUN, setting="amp")
    ] = None,
    channels_last: Annotated[
        bool | None, _opt("Memory format [auto].", RUN, "--channels-last/--no-channels-last")
    ] = None,
    compile: Annotated[
        bool | None,
        _opt(
            "torch.compile the model [{default}].", RUN, "--compile/--no-compile", setting="compile"
        ),
    ] = None,
    sync_bn: Annotated[
        bool | None,
        _opt(
            "SyncBatchNorm under DDP [{default}].", RUN, "--sync-bn/--no-sync-bn", setting="sync_bn"
        ),
    ] = None,
    seed: Annotated[int | None, _opt("Random seed [{default}].", RUN, setting="seed")] = None,
    deterministic: Annotated[
        bool | None,
        _opt(
            "Deterministic algorithms, main-process data [{default}].",
            RUN,
            "--deterministic/--no-deterministic",
            setting="deterministic",
        ),
    ] = None,
    out: Annotated[str | None, _opt("Run folder [runs/ARCH-BACKBONE].", OUT)] = None,
    overwrite: Annotated[
        bool | None,
        _opt(
            "Replace the run that --out already holds; without it that is refused [{default}].",
            OUT,
            "--overwrite",
            setting="overwrite",
        ),
    ] = None,
    resume: Annotated[str | None, _opt("Resume from a run's last.safetensors.", OUT)] = None,
    previews: Annotated[
        int | None, _opt("Preview PNGs to write [{default}].", OUT, setting="previews")
    ] = None,
    tracker: Annotated[
        str | None,
        _opt(
            "Also log to tensorboard (RUN/tensorboard) and/or mlflow (./mlruns or "
            "MLFLOW_TRACKING_URI), comma-separated; needs segcli[tensorboard] / segcli[mlflow].",
            OUT,
        ),
    ] = None,
    config: Annotated[str | None, _opt("TOML file with any of these settings.", OUT)] = None,
    print_config: Annotated[
        bool, _opt("Print the resolved config as TOML and exit.", OUT, "--print-config")
    ] = False,
    json_output: Json = False,
) -> None:
    """Train a model on a dataset folder (default: the bundled mock data).

    Writes best.safetensors, last.safetensors (+ resumable state), metrics.jsonl, curves.png and
    preview PNGs to the run folder. Ctrl-C saves and tells how to resume."""
    # Every parameter is a setting; None means "not given here", so TOML and defaults apply.
    flags = {
        k: v for k, v in locals().items() if k not in {"config", "print_config", "json_output"}
    }
    from segcli.cli.progress import Reporter
    from segcli.train.config import resolve_config
    from segcli.train.trainer import Trainer

    options = {name: flags.pop(name) for name in MODEL_OPTION_NAMES}
    flags["model_options"] = {k: v for k, v in options.items() if v is not None}
    base = None
    if resume:
        from segcli.checkpoint import read_checkpoint

        base = read_checkpoint(resume)[1].config
        base.pop("loss_resolved", None)
    resolved = resolve_config(config, flags, base=base)
    if print_config:
        sys.stdout.write(resolved.to_toml())
        return
    if resolved.folds is not None and resolved.fold is None:
        from segcli.train.folds import train_folds

        folds_summary = train_folds(resolved, Reporter())
        if folds_summary is None:
            return
        if json_output:
            print(json.dumps(folds_summary, indent=2))
            return
        _print_folds(folds_summary)
        return
    summary = Trainer(resolved, Reporter()).run()
    if summary is None:  # a DDP rank other than 0: rank 0 reports
        return
    if json_output:
        print(json.dumps(summary, indent=2))
        return
    _print_summary(summary)


def _print_folds(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(summary['folds'])}-fold cross-validation: {summary['run']}")
    for column in ("fold", "best epoch", "val mIoU", "checkpoint"):
        table.add_column(column, justify="left" if column == "checkpoint" else "right")
    for fold, result in enumerate(summary["folds"]):
        miou = result["val"]["miou"]
        table.add_row(
            str(fold), str(result["best_epoch"]), f"{miou:.4f}", result["best_checkpoint"]
        )
    console = Console()
    console.print(table)
    console.print(
        f"val mIoU {summary['miou_mean']:.4f} +- {summary['miou_std']:.4f} over the folds; "
        f"ensemble them with: seg predict {summary['run']} IMAGES --out DIR",
        soft_wrap=True,
    )


def _print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    val = summary["val"]
    table = Table(
        title=f"{summary['arch']}/{summary['backbone']}: best epoch {summary['best_epoch']}"
    )
    for column in ("class", "IoU", "Dice", "acc"):
        table.add_column(column, justify="left" if column == "class" else "right")

    def cell(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    for index, name in enumerate(summary["class_names"][: len(val["iou"])]):
        table.add_row(
            name, cell(val["iou"][index]), cell(val["dice"][index]), cell(val["acc"][index])
        )
    console = Console()
    console.print(table)
    console.print(
        f"val mIoU {cell(val['miou'])}  mDice {cell(val['mdice'])}  "
        f"pixel acc {cell(val['pixel_acc'])}"
        f"  ({summary['seconds']:.0f}s, {summary['precision']}) -> {summary['best_checkpoint']}",
        soft_wrap=True,
    )
