"""DataLoader construction: workers, pinned memory on CUDA, and seeding so a run is reproducible
(the shuffle order comes from a seeded generator; each worker seeds numpy and `random` from the
per-worker torch seed the DataLoader derives from that generator)."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def seed_worker(worker_id: int) -> None:
    """worker_init_fn: torch already seeds each worker from the loader's generator; give numpy and
    `random` the same seed so any code using them inside transforms is reproducible too."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


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
) -> DataLoader:
    """A DataLoader for training or evaluation. `workers > 0` keeps its worker processes alive
    between epochs (persistent workers); memory is pinned only when batches go to a CUDA device.
    With a `sampler` (e.g. DistributedSampler) `shuffle` is left to the sampler."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    options: dict[str, object] = {}
    if workers > 0:
        options["persistent_workers"] = True
        options["worker_init_fn"] = seed_worker
        if prefetch_factor is not None:
            options["prefetch_factor"] = prefetch_factor
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device_type == "cuda",
        drop_last=drop_last,
        generator=generator,
        **options,
    )
