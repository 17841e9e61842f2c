"""What several test modules build the same way."""

from __future__ import annotations

from pathlib import Path

import torch

from segcli.checkpoint import CheckpointInfo, model_build_config, save_checkpoint
from segcli.data import check_dataset, mock_root
from segcli.models import build_model
from segcli.train.config import TrainConfig


def randomise_attention(model: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """Give every attention module's parameters random values, as training would. CBAM starts
    as the identity (its gate layers are zero), so a test of what an attention module computes
    (export, a checkpoint round trip) needs gates that do something."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".attention." in name:
                parameter.normal_(0.0, std)
    return model


def write_mock_checkpoint(path: Path, seed: int = 0, attention: str | None = None) -> Path:
    """What the main job leaves in runs/unet-resnet18, with untrained seeded weights: a
    UNet-ResNet18 for the mock dataset's 3 classes, input size 64 x 64. Seeds give different
    weights (ensemble members); `attention` as `build_model`'s (None: the default)."""
    mapping = check_dataset(mock_root()).mapping
    torch.manual_seed(seed)
    model = build_model("unet", "resnet18", 3, mapping.num_classes, attention=attention).eval()
    info = CheckpointInfo(
        model=model_build_config(model),
        classes=mapping.to_dict(),
        input_size=(64, 64),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        ignore_index=mapping.ignore_index,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, model, info)
    return path


def fast_train_config(folder: Path, **overrides) -> TrainConfig:
    """A one-epoch ResNet18-UNet run on the bundled mock data at 32x32, in the main process,
    into `folder`; `overrides` are TrainConfig fields (`out` among them replaces `folder`).
    ResNet18 rather than the plain UNet (unet's default backbone): 14M parameters against
    31M, so each epoch's checkpoint and training state are less than half the bytes."""
    settings = {
        "arch": "unet",
        "backbone": "resnet18",
        "size": "32",
        "epochs": 1,
        "batch_size": 8,
        "workers": 0,
        "previews": 1,
        "out": str(folder),
        **overrides,
    }
    return TrainConfig(**settings)
