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
    DecoderChannels,
    DeepSupervision,
    Down,
    FcWidth,
    Json,
    OutputStride,
    Stride,
    Up,
)

OPT = "Optimisation"
DATA = "Data"
RUN = "Execution"
OUT = "Output"


def _opt(help: str, panel: str, *names: str) -> typer.models.OptionInfo:
    return typer.Option(*names, help=help, rich_help_panel=panel, show_default=False)


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
        _opt("ImageNet weights for the backbone.", "Model", "--pretrained/--no-pretrained"),
    ] = None,
    backbone_weights: Annotated[
        str | None, _opt("Backbone weights from a local file.", "Model")
    ] = None,
    data: Annotated[str | None, _opt("Dataset folder [default: bundled mock data].", DATA)] = None,
    classes_file: Annotated[str | None, _opt("Class table (names, colours).", DATA)] = None,
    foreground: Annotated[
        int | None, _opt("Raw mask value that is foreground in binary masks.", DATA)
    ] = None,
    in_channels: Annotated[int | None, _opt("Input channels [default: 3].", DATA)] = None,
    size: Annotated[str | None, _opt("Training size N or HxW [default: 256].", DATA)] = None,
    crop: Annotated[
        int | None,
        _opt(
            "Train on random N x N patches at native resolution instead of whole images "
            "resized to --size; eval and predict then slide N-pixel windows at that scale.",
            DATA,
        ),
    ] = None,
    scale: Annotated[
        float | None, _opt("With --crop: resize images by this factor first [1].", DATA)
    ] = None,
    augment: Annotated[
        bool | None, _opt("Augmentation on/off [default: on].", DATA, "--augment/--no-augment")
    ] = None,
    zoom: Annotated[
        str | None,
        _opt(
            "Scale jitter LOW,HIGH: resize by a random factor, then crop to --size "
            "[0.75,1.25; 1,1: off].",
            DATA,
        ),
    ] = None,
    scale_min: Annotated[
        float | None,
        _opt("Random resized crop of this smallest area instead of --zoom [off].", DATA),
    ] = None,
    hflip: Annotated[
        bool | None, _opt("Horizontal flips [on].", DATA, "--hflip/--no-hflip")
    ] = None,
    vflip: Annotated[bool | None, _opt("Vertical flips [off].", DATA, "--vflip/--no-vflip")] = None,
    rotate: Annotated[float | None, _opt("Max rotation, degrees [0: off].", DATA)] = None,
    color_jitter: Annotated[float | None, _opt("Colour jitter strength [0: off].", DATA)] = None,
    workers: Annotated[
        int | None, _opt("DataLoader workers [auto: 0 on a CPU of <=4 cores, else 2].", DATA)
    ] = None,
    epochs: Annotated[int | None, _opt("Epochs [50].", OPT)] = None,
    batch_size: Annotated[int | None, _opt("Batch size [8].", OPT)] = None,
    lr: Annotated[float | None, _opt("Learning rate [1e-3].", OPT)] = None,
    loss: Annotated[
        str | None, _opt("Loss, e.g. ce, dice+ce, 0.5*focal+dice [ce+0.5*dice].", OPT)
    ] = None,
    class_weights: Annotated[str | None, _opt("wce weights: 1,2,5 or auto.", OPT)] = None,
    focal_gamma: Annotated[float | None, _opt("Focal gamma [2].", OPT)] = None,
    focal_alpha: Annotated[float | None, _opt("Focal alpha.", OPT)] = None,
    tversky_alpha: Annotated[float | None, _opt("Tversky alpha [0.5].", OPT)] = None,
    tversky_beta: Annotated[float | None, _opt("Tversky beta [0.5].", OPT)] = None,
    dice_background: Annotated[
        bool | None,
        _opt("Dice counts background [on].", OPT, "--dice-background/--no-dice-background"),
    ] = None,
    optimizer: Annotated[str | None, _opt("sgd | adam | adamw | rmsprop [adamw].", OPT)] = None,
    weight_decay: Annotated[
        float | None, _opt("Weight decay, not on norms/biases [1e-4].", OPT)
    ] = None,
    momentum: Annotated[float | None, _opt("Momentum (sgd, rmsprop) [0.9].", OPT)] = None,
    nesterov: Annotated[
        bool | None, _opt("Nesterov momentum (sgd).", OPT, "--nesterov/--no-nesterov")
    ] = None,
    scheduler: Annotated[
        str | None, _opt("step | poly | cosine | plateau | none [cosine].", OPT)
    ] = None,
    warmup_epochs: Annotated[float | None, _opt("Linear warm-up epochs [0].", OPT)] = None,
    step_size: Annotated[int | None, _opt("step: epochs per decay [30].", OPT)] = None,
    gamma: Annotated[float | None, _opt("step: decay factor [0.1].", OPT)] = None,
    aux_weight: Annotated[float | None, _opt("Weight of auxiliary losses [per arch].", OPT)] = None,
    accum_steps: Annotated[int | None, _opt("Gradient accumulation steps [1].", OPT)] = None,
    clip_grad: Annotated[float | None, _opt("Clip gradient norm to this.", OPT)] = None,
    patience: Annotated[
        int | None, _opt("Early stop after N epochs without gain [0=off].", OPT)
    ] = None,
    time_limit: Annotated[
        float | None,
        _opt(
            "Wall-clock budget in minutes: plans the epochs that fit (at most --epochs) and "
            "ends the poly/cosine schedule there.",
            OPT,
        ),
    ] = None,
    device: Annotated[str | None, _opt("auto | cpu | cuda | mps [auto].", RUN)] = None,
    amp: Annotated[str | None, _opt("auto | bf16 | fp16 | off [auto].", RUN)] = None,
    channels_last: Annotated[
        bool | None, _opt("Memory format [auto].", RUN, "--channels-last/--no-channels-last")
    ] = None,
    compile: Annotated[
        bool | None, _opt("torch.compile the model.", RUN, "--compile/--no-compile")
    ] = None,
    sync_bn: Annotated[
        bool | None, _opt("SyncBatchNorm under DDP.", RUN, "--sync-bn/--no-sync-bn")
    ] = None,
    seed: Annotated[int | None, _opt("Random seed [0].", RUN)] = None,
    deterministic: Annotated[
        bool | None,
        _opt(
            "Deterministic algorithms, main-process data.",
            RUN,
            "--deterministic/--no-deterministic",
        ),
    ] = None,
    out: Annotated[str | None, _opt("Run folder [runs/ARCH-BACKBONE].", OUT)] = None,
    resume: Annotated[str | None, _opt("Resume from a run's last.safetensors.", OUT)] = None,
    previews: Annotated[int | None, _opt("Preview PNGs to write [4].", OUT)] = None,
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
    summary = Trainer(resolved, Reporter()).run()
    if summary is None:  # a DDP rank other than 0: rank 0 reports
        return
    if json_output:
        print(json.dumps(summary, indent=2))
        return
    _print_summary(summary)


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
