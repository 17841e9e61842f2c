"""Flags shared by several commands, declared once so every command spells them the same."""

from __future__ import annotations

from typing import Annotated

import typer

MODEL_PANEL = "Model"

Backbone = Annotated[
    str | None,
    typer.Option(
        "--backbone",
        "-b",
        help="Encoder: none, resnet18..152, vgg11..19[_bn]; default per arch.",
        rich_help_panel=MODEL_PANEL,
    ),
]
Classes = Annotated[
    int,
    typer.Option(
        "--classes",
        "-c",
        min=1,
        help="Output classes (1 = binary, one logit).",
        rich_help_panel=MODEL_PANEL,
    ),
]
InChannels = Annotated[
    int,
    typer.Option(
        "--in-channels",
        min=1,
        help="Input channels (1 gray, 3 RGB, 4 RGBA...).",
        rich_help_panel=MODEL_PANEL,
    ),
]
Up = Annotated[
    str | None,
    typer.Option(
        help="UNet family upsampling: transpose | bilinear | nearest (UNet only) "
        "[the decoder's: nearest for fast, else transpose].",
        rich_help_panel=MODEL_PANEL,
    ),
]
Down = Annotated[
    str | None,
    typer.Option(
        help="Plain UNet downsampling: maxpool | conv (UNet-2).", rich_help_panel=MODEL_PANEL
    ),
]
Attention = Annotated[
    str | None,
    typer.Option(
        help="UNet family decoder attention: none | cbam | self [UNet's fast decoder: cbam; "
        "else none].",
        rich_help_panel=MODEL_PANEL,
    ),
]
DeepSupervision = Annotated[
    bool | None,
    typer.Option(
        "--deep-supervision/--no-deep-supervision",
        help="Side outputs trained with the main one: UNet++, UNet3+, and UNet (at 1/8 and 1/4).",
        rich_help_panel=MODEL_PANEL,
    ),
]
Cgm = Annotated[
    bool | None,
    typer.Option(
        "--cgm/--no-cgm", help="UNet3+ classification-guided module.", rich_help_panel=MODEL_PANEL
    ),
]
OutputStride = Annotated[
    int | None,
    typer.Option(
        help="DeepLab/PSPNet/FCN-ResNet output stride: 8 | 16 (| 32 for FCN).",
        rich_help_panel=MODEL_PANEL,
    ),
]
Aux = Annotated[
    bool | None,
    typer.Option(
        "--aux/--no-aux",
        help="Auxiliary head (DeepLab, PSPNet, FCN-ResNet).",
        rich_help_panel=MODEL_PANEL,
    ),
]
Stride = Annotated[
    int | None,
    typer.Option(help="FCN on VGG: 32 | 16 | 8 (FCN-32s/16s/8s).", rich_help_panel=MODEL_PANEL),
]
FcWidth = Annotated[
    int | None,
    typer.Option(help="FCN on VGG: fc6/fc7 width [4096].", rich_help_panel=MODEL_PANEL),
]
DecoderChannels = Annotated[
    str | None,
    typer.Option(
        help="UNet decoder: published (512,256,128,64, the parameter table) | fast "
        "(256,128,64,32,16, nearest up; 0.58x the FLOPs) | 4 or 5 widths, deep to shallow "
        "[fast on ResNet encoders, else published].",
        rich_help_panel=MODEL_PANEL,
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


# Every architecture option a command exposes, named as the builders' keyword arguments; the
# registry's option lists must be covered by it (tests/test_cli_params.py checks both ways).
MODEL_OPTION_NAMES = (
    "up",
    "down",
    "attention",
    "deep_supervision",
    "cgm",
    "output_stride",
    "aux",
    "stride",
    "fc_width",
    "decoder_channels",
)


def model_options(**flags: object) -> dict[str, object]:
    """The architecture options the user actually gave (None means 'architecture default')."""
    return {name: value for name, value in flags.items() if value is not None}


RUN_PANEL = "Run"
Device = Annotated[
    str, typer.Option(help="auto | cpu | cuda[:N] | mps.", rich_help_panel=RUN_PANEL)
]
Amp = Annotated[
    str,
    typer.Option(
        help="auto | bf16 | fp16 | off (auto: bf16 on CUDA, and on CPUs where it is native "
        "and measured faster than fp32; else fp32).",
        rich_help_panel=RUN_PANEL,
    ),
]
Runtime = Annotated[
    str,
    typer.Option(
        envvar="SEGCLI_RUNTIME",
        help="auto | torch | onnxruntime | openvino. The last two run a float32 ONNX export of "
        "the checkpoint, made once and cached in the run's cache/ folder; auto times the "
        "runtimes installed here on the checkpoint once per CPU kind and keeps the fastest "
        "(torch on GPUs, under --amp bf16/fp16 and for ensembles).",
        rich_help_panel=RUN_PANEL,
    ),
]
Workers = Annotated[
    int | None,
    typer.Option(
        min=0,
        help="DataLoader workers [auto: 0 on a CPU with at most 4 cores, else 2].",
        rich_help_panel=RUN_PANEL,
        show_default=False,
    ),
]

# How an image becomes a mask: the same flags on seg predict and seg eval.
Threshold = Annotated[
    float | None,
    typer.Option(
        help="Foreground probability cut of a binary model [the checkpoint's, 0.5].",
        rich_help_panel=RUN_PANEL,
    ),
]
Tile = Annotated[
    int | None,
    typer.Option(
        help="Gaussian-weighted sliding windows of this many pixels over the image at the "
        "scale the model was trained at (memory bound for big images).",
        rich_help_panel=RUN_PANEL,
    ),
]
Overlap = Annotated[
    float,
    typer.Option(help="Window overlap fraction with --tile.", rich_help_panel=RUN_PANEL),
]
Tta = Annotated[
    bool,
    typer.Option("--tta", help="Average the logits of flipped images.", rich_help_panel=RUN_PANEL),
]

DATA_PANEL = "Data"
# Data-layout flags of `seg train` and `seg check`: train's default to None (so a TOML file
# and --resume can tell a flag given from one left out), check's to the same behaviour.
DataFormat = Annotated[
    str | None,
    typer.Option(
        "--format",
        help="Dataset layout: auto | folders | flat | voc | cityscapes | ade20k | coco | "
        "labelme [auto: detected].",
        rich_help_panel=DATA_PANEL,
        show_default=False,
    ),
]
IgnoreValues = Annotated[
    str | None,
    typer.Option(
        "--ignore-values",
        help="Raw mask values read as ignore besides 255, e.g. 11 (CamVid void) or 0,11.",
        rich_help_panel=DATA_PANEL,
        show_default=False,
    ),
]
ReduceZeroLabel = Annotated[
    bool | None,
    typer.Option(
        "--reduce-zero-label/--no-reduce-zero-label",
        help="Raw 0 means 'other' (ignored) and raw k is class k-1, as in ADE20K; predictions "
        "are written back as k [auto: on for the ADE20K layout].",
        rich_help_panel=DATA_PANEL,
        show_default=False,
    ),
]
