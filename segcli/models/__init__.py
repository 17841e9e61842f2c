"""Segmentation models: one module per architecture, all built through `build_model`."""

from segcli.models import unet  # noqa: F401  (registers the architecture)
from segcli.models.registry import MODELS, build_model, get_entry

__all__ = ["MODELS", "build_model", "get_entry"]
