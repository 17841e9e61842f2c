"""Where an epoch of `seg train` spends its wall-clock: data (decode + augmentation + collate,
waited for by the training loop), forward, loss, backward, optimizer step, validation, checkpoint
writes, the curves PNG and the previews.

    python benchmarks/profile_epoch.py --backbone resnet18 --size 128 --batch-size 2 \
        --epochs 6 --lr 2e-3                           # the main job (README command 1)
    python benchmarks/profile_epoch.py --data ../shared/data/stanford_background --epochs 1

It trains exactly as `seg train ARCH` would (the same TrainConfig defaults, the Trainer), with
timers attached from outside: a wrapper around the training loader's iterator, forward hooks on
the model, a wrapper of `Tensor.backward`, optimizer step hooks, and wrappers of the Trainer's
save / preview methods and of `evaluate`. On a CPU every kernel is synchronous, so the timers
measure the work itself; on CUDA the figures would need synchronisation and are not meaningful.
Run it on an otherwise idle machine; name the CPU (`lscpu`) beside its figures.
"""

from __future__ import annotations

import argparse
import collections
import time
from contextlib import contextmanager
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="unet")
    parser.add_argument("--backbone", default=None)
    parser.add_argument("--data", default=None, help="dataset folder (default: the mock data)")
    parser.add_argument("--size", default=None)
    parser.add_argument("--epochs", type=int, default=None, help="default: TrainConfig's")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--out", default="/tmp/segcli-profile-epoch")
    args = parser.parse_args()

    import segcli.train.trainer as trainer_module
    from segcli.train.config import TrainConfig
    from segcli.train.trainer import Trainer

    options = {
        "arch": args.arch,
        "backbone": args.backbone,
        "data": args.data,
        "workers": args.workers,
        "out": args.out,
    }
    if args.size:
        options["size"] = args.size
    for name in ("epochs", "batch_size", "lr"):
        if getattr(args, name):
            options[name] = getattr(args, name)
    config = TrainConfig(**options)
    out = Path(args.out)
    if out.exists():
        for path in out.iterdir():
            path.unlink()

    totals: dict[str, float] = collections.defaultdict(float)

    @contextmanager
    def timed(name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            totals[name] += time.perf_counter() - started

    def wrap(owner, attribute: str, name: str) -> None:
        original = getattr(owner, attribute, None)
        if original is None:  # an older segcli, profiled for comparison
            return

        def timed_call(*a, **k):
            with timed(name):
                return original(*a, **k)

        setattr(owner, attribute, timed_call)

    wrap(trainer_module, "evaluate", "validation")
    wrap(trainer_module, "plot_curves", "curves png")
    wrap(trainer_module, "save_checkpoint", "checkpoint writes")
    wrap(trainer_module, "save_training_state", "checkpoint writes")
    wrap(trainer_module, "atomic_link", "checkpoint writes")
    wrap(trainer_module, "weights_digest", "checkpoint writes")
    wrap(Trainer, "_save_previews", "previews")
    wrap(torch.Tensor, "backward", "backward")

    trainer = Trainer(config)
    setup = trainer._setup

    def instrumented_setup() -> None:
        with timed("setup (data index, model build)"):
            setup()
        trainer._setup = lambda: None
        model, optimizer, loader = trainer.model, trainer.optimizer, trainer.train_loader
        forward_started: list[float] = []
        model.register_forward_pre_hook(lambda *_: forward_started.append(time.perf_counter()))

        def forward_done(*_):
            if model.training:
                totals["forward"] += time.perf_counter() - forward_started.pop()
            else:
                forward_started.pop()

        model.register_forward_hook(forward_done)
        step_started: list[float] = []
        optimizer.register_step_pre_hook(lambda *_: step_started.append(time.perf_counter()))
        optimizer.register_step_post_hook(
            lambda *_: totals.__setitem__(
                "optimizer step",
                totals["optimizer step"] + time.perf_counter() - step_started.pop(),
            )
        )
        loader_iter = type(loader).__iter__

        class TimedIterator:
            def __init__(self, inner):
                self.inner = inner

            def __iter__(self):
                return self

            def __next__(self):
                with timed("data (decode, augment, collate)"):
                    return next(self.inner)

        class TimedLoader(type(loader)):
            def __iter__(self):
                return TimedIterator(loader_iter(self))

        loader.__class__ = TimedLoader

    trainer._setup = instrumented_setup
    started = time.perf_counter()
    summary = trainer.run()
    wall = time.perf_counter() - started

    records = [__import__("json").loads(line) for line in (out / "metrics.jsonl").open()]
    epoch_seconds = sum(r["seconds"] for r in records)
    step_parts = ["data (decode, augment, collate)", "forward", "backward", "optimizer step"]
    loss_and_rest = epoch_seconds - sum(totals[name] for name in step_parts)
    print(f"{len(records)} epochs, final val mIoU {summary['val']['miou']:.4f}")
    print(f"{'part':36s} {'seconds':>8s} {'share':>6s}")
    rows = [(name, totals[name]) for name in step_parts]
    rows.append(("loss, logging, rest of the step", loss_and_rest))
    rows += [
        (name, totals[name])
        for name in ("validation", "checkpoint writes", "curves png", "previews")
    ]
    rows.append(("setup (data index, model build)", totals["setup (data index, model build)"]))
    accounted = sum(seconds for _, seconds in rows)
    rows.append(("other (between the above)", wall - accounted))
    for name, seconds in rows:
        print(f"{name:36s} {seconds:8.2f} {seconds / wall:6.1%}")
    print(f"{'wall-clock of Trainer.run':36s} {wall:8.2f}")


if __name__ == "__main__":
    main()
