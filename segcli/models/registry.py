"""The model registry: every architecture registers its builder here, and every command builds
models through `build_model`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from segcli.errors import UsageError

COMMON_ARGUMENTS = ("backbone", "in_channels", "classes")


@dataclass(frozen=True)
class ModelEntry:
    name: str
    title: str
    builder: Callable[..., nn.Module]
    backbones: tuple[str, ...]
    default_backbone: str

    @property
    def options(self) -> dict[str, object]:
        """Architecture-specific keyword options and their defaults."""
        signature = inspect.signature(self.builder)
        return {
            name: parameter.default
            for name, parameter in signature.parameters.items()
            if name not in COMMON_ARGUMENTS and parameter.kind is parameter.KEYWORD_ONLY
        }


MODELS: dict[str, ModelEntry] = {}


def register_model(
    name: str, *, title: str, backbones: tuple[str, ...], default_backbone: str
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that adds an architecture's builder to the registry."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        # A second builder under one name would silently replace the first.
        if name in MODELS:
            raise ValueError(f"architecture '{name}' is registered twice")
        MODELS[name] = ModelEntry(name, title, builder, backbones, default_backbone)
        return builder

    return decorate


def get_entry(arch: str) -> ModelEntry:
    if arch not in MODELS:
        raise UsageError(f"unknown architecture '{arch}'; valid: {', '.join(MODELS)}")
    return MODELS[arch]


def resolve_backbone(arch: str, backbone: str | None) -> str:
    entry = get_entry(arch)
    if backbone is None:
        return entry.default_backbone
    if backbone not in entry.backbones:
        raise UsageError(
            f"'{backbone}' is not a backbone of {arch}; valid: {', '.join(entry.backbones)}"
        )
    return backbone


def build_model(
    arch: str,
    backbone: str | None = None,
    in_channels: int = 3,
    classes: int = 1,
    **options: object,
) -> nn.Module:
    """Build architecture `arch` on `backbone` (its default when None).

    `options` are the architecture's own keyword options (see `ModelEntry.options`); options
    that are None fall back to the architecture's defaults. The returned model carries the
    arguments that rebuild it in `model.build_config`."""
    entry = get_entry(arch)
    backbone = resolve_backbone(arch, backbone)
    if in_channels < 1:
        raise UsageError(f"`in_channels` must be at least 1, not {in_channels}")
    if classes < 1:
        raise UsageError(f"`classes` must be at least 1, not {classes}")
    known = entry.options
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(known))
    if unknown:
        valid = ", ".join(known) or "none"
        raise UsageError(f"{arch} has no option {', '.join(unknown)}; its options: {valid}")
    model = entry.builder(backbone=backbone, in_channels=in_channels, classes=classes, **given)
    model.build_config = {
        "arch": arch,
        "backbone": backbone,
        "in_channels": in_channels,
        "classes": classes,
        # Builders that resolve defaults from other arguments record what they chose.
        "options": {**known, **given, **getattr(model, "resolved_options", {})},
    }
    return model
