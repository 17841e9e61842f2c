"""The base every segcli model derives from.

A model takes N x C x H x W of any H and W: it pads the input to a multiple of its
`size_divisor`, runs `forward_padded`, and crops the logits back to H x W. In eval mode it
returns the logits tensor (N x classes x H x W), which is what export, predict and eval use.
In training mode a model with auxiliary outputs (deep supervision, auxiliary heads, a
classification-guided module) returns a dict instead:

    {"out": logits, "aux": [logits, ...], "cls": N x classes presence logits (optional)}

and the engine adds `aux_weight` times the loss of each auxiliary output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ModelOutput = torch.Tensor | dict[str, object]


class SegmentationModel(nn.Module):
    """Pads to `size_divisor`, crops back, and defines the auxiliary-output contract."""

    aux_weight: float = 1.0
    # Smallest training batch: a BatchNorm after global pooling sees one value per image and
    # cannot normalise a batch of one.
    min_train_batch: int = 1

    def __init__(self, size_divisor: int) -> None:
        super().__init__()
        self.size_divisor = size_divisor

    def forward_padded(self, x: torch.Tensor) -> ModelOutput:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> ModelOutput:
        height, width = x.shape[-2:]
        divisor = self.size_divisor
        x = F.pad(x, (0, (-width) % divisor, 0, (-height) % divisor))
        out = self.forward_padded(x)
        if isinstance(out, torch.Tensor):
            return out[..., :height, :width]
        cropped: dict[str, object] = {"out": out["out"][..., :height, :width]}
        cropped["aux"] = [a[..., :height, :width] for a in out.get("aux", [])]
        if "cls" in out:
            cropped["cls"] = out["cls"]
        return cropped
