"""DataLoader construction: workers, pinned memory on CUDA, and seeding so a run is reproducible
(the shuffle order comes from a seeded generator; each worker seeds numpy and `random` from the
per-worker torch seed the DataLoader derives from that generator)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from segcli.errors import UsageError


def seed_worker(worker_id: int) -> None:
    """worker_init_fn: torch already seeds each worker from the loader's generator; give numpy and
    `random` the same seed so any code using them inside transforms is reproducible too."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def image_sizes(paths: Sequence[Path]) -> list[tuple[int, int] | None]:
    """(H, W) of each image from its header alone (no decoding), None where it cannot be read:
    such files fail later, by name, when they are decoded."""
    from segcli.data.io import read_header

    sizes: list[tuple[int, int] | None] = []
    for path in paths:
        try:
            sizes.append(read_header(path)[1])
        except UsageError:
            sizes.append(None)
    return sizes


def batches_by_size(sizes: Sequence[tuple[int, int] | None], batch_size: int) -> list[list[int]]:
    """Index batches for a DataLoader's `batch_sampler` in which all images share one size, so
    they stack without resizing: sizes in order of first appearance, each cut into batches of at
    most `batch_size` in input order. An unknown size (None) is a batch of its own."""
    groups: dict[object, list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault(size if size is not None else ("unknown", index), []).append(index)
    return [
        group[start : start + batch_size]
        for group in groups.values()
        for start in range(0, len(group), batch_size)
    ]


def native_masks_collate(
    items: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Images (all at the model size) stacked; masks (each at its image's own size) as a list."""
    return torch.stack([image for image, _ in items]), [mask for _, mask in items]


def build_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    workers: int,
    seed: int,
    device_type: str,
    drop_last: bool = False,
    sampler: Sampler | None = None,
    prefetch_factor: int | None = None,
    batch_sampler: Sequence[list[int]] | None = None,
    collate_fn: Callable[..., Any] | None = None,
) -> DataLoader:
    """A DataLoader for training or evaluation. `workers > 0` keeps its worker processes alive
    between epochs (persistent workers); memory is pinned only when batches go to a CUDA device.
    With a `sampler` (e.g. DistributedSampler) `shuffle` is left to the sampler; a `batch_sampler`
    (e.g. `batches_by_size`) fixes the batches and their order."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    options: dict[str, object] = {}
    if workers > 0:
        options["persistent_workers"] = True
        options["worker_init_fn"] = seed_worker
        if prefetch_factor is not None:
            options["prefetch_factor"] = prefetch_factor
    if collate_fn is not None:
        options["collate_fn"] = collate_fn
    if batch_sampler is not None:
        options["batch_sampler"] = batch_sampler
    else:
        options.update(
            batch_size=batch_size,
            shuffle=shuffle if sampler is None else False,
            sampler=sampler,
            drop_last=drop_last,
        )
    return DataLoader(
        dataset,
        num_workers=workers,
        pin_memory=device_type == "cuda",
        generator=generator,
        **options,
    )
