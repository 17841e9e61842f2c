"""Attention modules the UNet-family decoders can apply after each block (`--attention`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_KINDS = ("none", "cbam", "self")


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al. 2018): a channel gate from average- and
    max-pooled descriptors through one shared MLP, then a 7x7 spatial gate.

    Each gate is `gate_gain * sigmoid(...)`, with gain 2 and the layers before the sigmoids
    zeroed, so the module starts as the identity and learns to damp or boost. Gates whose
    layers are He-initialised with the rest of the decoder start as a random mask: on
    stanford_background (README, "Accuracy per CPU-minute") they gave 0.370 val mIoU after
    the first epoch against 0.386 without attention, the open start 0.395, and it ended
    within 0.004 of them. Files written with the He-initialised gates hold no `gate_gain` and
    load with gain 1, the form they were trained with."""

    def __init__(self, channels: int, reduction: int = 16, spatial_kernel: int = 7) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=True),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=True),
        )
        self.spatial = nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2, bias=False)
        self.register_buffer("gate_gain", torch.tensor(2.0))
        self.open_gates()

    def open_gates(self) -> None:
        """Zero the layers that feed the sigmoids: both gates pass their input unchanged.
        `he_init` calls this after initialising a decoder, whose pass would overwrite it."""
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        nn.init.zeros_(self.spatial.weight)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        state_dict.setdefault(prefix + "gate_gain", torch.tensor(1.0))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The gates are elementwise passes over every decoder map, memory-bound on a CPU. Means
        # are taken as sums, whose backward is a broadcast view where a mean's writes a full map,
        # and the channel max keeps its indices, whose backward scatters where amax's compares
        # and divides: the same values and gradients in 0.70x the time (benchmarks/bench_cbam.py).
        channels, height, width = x.shape[1:]
        avg = self.mlp(x.sum(dim=(2, 3), keepdim=True) / (height * width))
        peak = self.mlp(F.adaptive_max_pool2d(x, 1))
        x = x * (self.gate_gain * torch.sigmoid(avg + peak))
        descriptor = torch.cat(
            [x.sum(dim=1, keepdim=True) / channels, x.max(dim=1, keepdim=True).values], dim=1
        )
        return x * (self.gate_gain * torch.sigmoid(self.spatial(descriptor)))


class SelfAttention(nn.Module):
    """SAGAN self-attention (Zhang et al. 2019): query/key projections at C/8, a learnable
    residual scale initialised to 0 so the block starts as the identity.

    Keys and values are average-pooled to at most `max_keys_side`² positions: full attention
    over a 256x256 decoder map would need a 65536² matrix, pooled keys keep memory linear in
    the number of pixels."""

    def __init__(self, channels: int, max_keys_side: int = 16) -> None:
        super().__init__()
        inner = max(channels // 8, 1)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.max_keys_side = max_keys_side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        context = x
        if h > self.max_keys_side or w > self.max_keys_side:
            context = F.adaptive_avg_pool2d(
                x, (min(h, self.max_keys_side), min(w, self.max_keys_side))
            )
        q = self.query(x).flatten(2).transpose(1, 2)  # N, HW, C/8
        k = self.key(context).flatten(2)  # N, C/8, K
        v = self.value(context).flatten(2).transpose(1, 2)  # N, K, C
        attention = torch.softmax(q @ k, dim=-1)
        out = (attention @ v).transpose(1, 2).reshape(n, c, h, w)
        return x + self.gamma * out


def attention_block(kind: str, channels: int) -> nn.Module:
    """The attention module named by `--attention` for a block of `channels` channels."""
    if kind == "cbam":
        return CBAM(channels)
    if kind == "self":
        return SelfAttention(channels)
    return nn.Identity()
