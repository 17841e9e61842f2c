"""Segmentation models: one module per architecture, all built through `build_model`."""

# Importing an architecture's module registers it.
from segcli.models import (  # noqa: F401
    deeplab,
    fchardnet,
    fcn,
    pspnet,
    segnet,
    unet,
    unet3p,
    unetpp,
)
from segcli.models.registry import MODELS, build_model, get_entry

__all__ = ["MODELS", "build_model", "get_entry"]
