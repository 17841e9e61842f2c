import json
import math

import pytest
import torch
from torch import nn

from segcli.errors import UsageError
from segcli.train.optim import OPTIMIZERS, SCHEDULERS, build_optimizer, build_scheduler


def small_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 1),
        nn.GroupNorm(2, 4),
        nn.Conv2d(4, 2, 1),
    )


def test_weight_decay_skips_norm_layers_and_biases():
    model = small_model()
    optimizer = build_optimizer(model, "sgd", lr=0.1, weight_decay=1e-4)
    decay, no_decay = optimizer.param_groups
    weights = {id(model[i].weight) for i in (0, 2, 4)}
    assert {id(p) for p in decay["params"]} == weights
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    all_ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in model.parameters())


def test_adamw_decays_weights_only():
    # With zero gradients AdamW's only update is the decoupled decay p -= lr * wd * p.
    model = small_model()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
            p.grad = torch.zeros_like(p)
    optimizer = build_optimizer(model, "adamw", lr=0.1, weight_decay=0.5)
    optimizer.step()
    assert torch.allclose(model[0].weight, torch.full_like(model[0].weight, 0.95))
    for p in (model[1].weight, model[1].bias, model[2].bias, model[3].weight):
        assert torch.equal(p, torch.ones_like(p))


def test_each_optimizer_and_its_hyperparameters():
    model = small_model()
    kinds = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
    kinds["rmsprop"] = torch.optim.RMSprop
    assert set(OPTIMIZERS) == set(kinds)
    for name, kind in kinds.items():
        optimizer = build_optimizer(model, name, lr=0.01, momentum=0.8)
        assert isinstance(optimizer, kind) and optimizer.param_groups[0]["lr"] == 0.01
    sgd = build_optimizer(model, "sgd", lr=0.01, nesterov=True)
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"] is True
    assert build_optimizer(model, "rmsprop", lr=0.01, momentum=0.5).defaults["momentum"] == 0.5


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_fused_step_equals_torch_reference_step(name: str) -> None:
    # Catches a fused optimizer built with other hyper-parameters, or a fused path that updates
    # differently from torch's default per-parameter implementation.
    torch.manual_seed(0)
    model = small_model()
    reference = small_model()
    reference.load_state_dict(model.state_dict())
    optimizer = build_optimizer(model, name, lr=0.01, weight_decay=0.1, momentum=0.8)
    assert optimizer.defaults.get("fused") is True  # the CPU has the fused kernels
    groups = [
        {"params": list(g["params"]), "weight_decay": g["weight_decay"]}
        for g in build_optimizer(reference, "sgd", lr=1, weight_decay=0.1).param_groups
    ]
    kind = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    extra = {"momentum": 0.8} if name == "sgd" else {}
    plain = kind(groups, lr=0.01, foreach=False, **extra)
    for _ in range(3):
        x = torch.randn(2, 3, 8, 8)
        for net, opt in ((model, optimizer), (reference, plain)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for fused_p, plain_p in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(fused_p, plain_p, rtol=1e-5, atol=1e-6)


def test_optimizer_usage_errors():
    model = small_model()
    with pytest.raises(UsageError, match="valid: sgd, adam, adamw, rmsprop"):
        build_optimizer(model, "lion", lr=0.1)
    with pytest.raises(UsageError, match="nesterov"):
        build_optimizer(model, "adam", lr=0.1, nesterov=True)
    with pytest.raises(UsageError, match="`lr`"):
        build_optimizer(model, "sgd", lr=0.0)


def lr_curve(name: str, *, epochs: int, steps: int, lr: float = 1.0, **kwargs) -> list[float]:
    """The lr used by every optimizer step of a short run, both groups checked equal."""
    optimizer = build_optimizer(small_model(), "sgd", lr=lr)
    schedule = build_scheduler(optimizer, name, epochs=epochs, steps_per_epoch=steps, **kwargs)
    curve = []
    for _ in range(epochs):
        for _ in range(steps):
            lrs = {group["lr"] for group in optimizer.param_groups}
            assert len(lrs) == 1 and lrs == {schedule.current_lr()}
            curve.append(schedule.current_lr())
            optimizer.step()
            schedule.step_iteration()
        schedule.step_epoch(None)
    return curve


def torch_curve(scheduler_class, *, iterations: int, **kwargs) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = scheduler_class(optimizer, **kwargs)
    curve = []
    for _ in range(iterations):
        curve.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return curve


def test_step_is_per_epoch():
    curve = lr_curve("step", epochs=5, steps=2, step_size=2, gamma=0.1)
    assert curve == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01])


def test_poly_is_per_iteration_and_matches_torch():
    curve = lr_curve("poly", epochs=2, steps=5)
    reference = torch_curve(
        torch.optim.lr_scheduler.PolynomialLR, iterations=10, total_iters=10, power=0.9
    )
    assert curve == pytest.approx(reference)
    assert curve[0] == 1.0 and curve[1] == pytest.approx(0.9**0.9)  # moved inside epoch 1


def test_cosine_matches_torch_with_min_lr():
    curve = lr_curve("cosine", epochs=3, steps=4, min_lr=0.1)
    reference = torch_curve(
        torch.optim.lr_scheduler.CosineAnnealingLR, iterations=12, T_max=12, eta_min=0.1
    )
    assert curve == pytest.approx(reference)


def test_linear_warmup_composes_with_poly():
    curve = lr_curve("poly", epochs=3, steps=4, warmup_epochs=1)
    warmup = [0.25, 0.5, 0.75, 1.0]
    decay = [(1 - j / 8) ** 0.9 for j in range(8)]  # poly over the 8 iterations after warm-up
    assert curve == pytest.approx(warmup + decay)


def test_warmup_composes_with_step_and_none():
    assert lr_curve("none", epochs=2, steps=2, warmup_epochs=1) == pytest.approx([0.5, 1, 1, 1])
    curve = lr_curve("step", epochs=3, steps=2, warmup_epochs=1, step_size=1, gamma=0.5)
    assert curve == pytest.approx([0.5, 1, 0.5, 0.5, 0.25, 0.25])


def test_plateau_matches_torch_reduce_on_plateau():
    mious = [0.5, 0.6, 0.6, 0.59, 0.6, 0.7, 0.7, 0.7, 0.7]
    optimizer = build_optimizer(small_model(), "sgd", lr=1.0)
    schedule = build_scheduler(
        optimizer, "plateau", epochs=9, steps_per_epoch=3, gamma=0.5, patience=1
    )
    reference_optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(
        reference_optimizer, mode="max", factor=0.5, patience=1
    )
    for miou in mious:
        for _ in range(3):
            schedule.step_iteration()  # per-iteration steps leave plateau alone
        schedule.step_epoch(miou)
        reference.step(miou)
        assert schedule.current_lr() == pytest.approx(reference_optimizer.param_groups[0]["lr"])
    assert schedule.current_lr() == 0.25
    schedule.step_epoch(math.nan)  # a NaN mIoU (empty validation) is no evidence
    assert schedule.current_lr() == 0.25


def test_state_dict_is_json_and_resumes_the_same_curve():
    full = lr_curve("cosine", epochs=4, steps=3, warmup_epochs=1)
    optimizer = build_optimizer(small_model(), "sgd", lr=1.0)
    schedule = build_scheduler(optimizer, "cosine", epochs=4, steps_per_epoch=3, warmup_epochs=1)
    for _ in range(5):
        schedule.step_iteration()
    state = json.loads(json.dumps(schedule.state_dict(), allow_nan=False))
    resumed_optimizer = build_optimizer(small_model(), "sgd", lr=1.0)
    resumed = build_scheduler(
        resumed_optimizer, "cosine", epochs=4, steps_per_epoch=3, warmup_epochs=1
    )
    resumed.load_state_dict(state)
    rest = []
    for _ in range(7):
        rest.append(resumed.current_lr())
        resumed.step_iteration()
    assert rest == pytest.approx(full[5:])
    other = build_scheduler(resumed_optimizer, "poly", epochs=4, steps_per_epoch=3)
    with pytest.raises(UsageError, match="cannot resume"):
        other.load_state_dict(state)


def cosine_lr(t: float) -> float:
    return (1 + math.cos(math.pi * t)) / 2


def test_plan_epochs_moves_the_end_of_a_cosine_without_a_jump():
    # Catches a re-plan that jumps the lr (the curve recomputed as if it had always ended at
    # the new epoch count: a cut from 10 to 2 epochs after 3 of 30 steps would drop it from
    # 0.98 to 0.5), a tail that does not end at the new end, and a tail that is not the rest
    # of the cosine stretched over the remaining steps.
    optimizer = build_optimizer(small_model(), "sgd", lr=1.0)
    schedule = build_scheduler(optimizer, "cosine", epochs=10, steps_per_epoch=3)
    for _ in range(3):
        schedule.step_iteration()
    before = schedule.current_lr()
    assert before == pytest.approx(cosine_lr(0.1))
    schedule.plan_epochs(2)
    assert schedule.current_lr() == before
    tail = []
    for _ in range(3):
        schedule.step_iteration()
        tail.append(schedule.current_lr())
    # t goes from 0.1 to 1 in three equal steps: 0.4, 0.7, 1.0.
    assert tail == pytest.approx([cosine_lr(0.4), cosine_lr(0.7), 0.0], abs=1e-12)
    assert schedule.annealed


def test_plan_epochs_during_warmup_keeps_the_whole_curve_after_it():
    # Catches an anchor taken inside the warm-up, which would start the decay at the planned
    # point instead of after warm-up.
    optimizer = build_optimizer(small_model(), "sgd", lr=1.0)
    schedule = build_scheduler(optimizer, "cosine", epochs=10, steps_per_epoch=2, warmup_epochs=1)
    schedule.step_iteration()
    schedule.plan_epochs(3)
    got = [schedule.current_lr()]
    for _ in range(4):
        schedule.step_iteration()
        got.append(schedule.current_lr())
    assert got == pytest.approx(lr_curve("cosine", epochs=3, steps=2, warmup_epochs=1)[1:])


def test_more_epochs_after_a_finished_curve_follow_the_tail_of_a_longer_one():
    # Catches a finished cosine stretched from its end (every added step at min_lr = 0, so a
    # time limit's extra epoch could not learn) and one restarted at the peak lr.
    optimizer = build_optimizer(small_model(), "sgd", lr=1.0)
    schedule = build_scheduler(optimizer, "cosine", epochs=2, steps_per_epoch=2)
    for _ in range(3):
        schedule.step_iteration()
    assert not schedule.annealed
    schedule.step_iteration()
    assert schedule.annealed and schedule.current_lr() == 0.0
    schedule.plan_epochs(4)
    tail = [schedule.current_lr()]
    for _ in range(4):
        schedule.step_iteration()
        tail.append(schedule.current_lr())
    assert tail == pytest.approx([*lr_curve("cosine", epochs=4, steps=2)[4:], 0.0], abs=1e-12)
    for name in ("step", "plateau", "none"):
        other = build_scheduler(optimizer, name, epochs=1, steps_per_epoch=1)
        other.step_iteration()
        assert not other.annealed, name


def test_a_resumed_re_planned_schedule_keeps_its_curve_and_can_be_extended():
    # Catches a saved state that forgets a time limit's re-planned end (the resumed run would
    # follow the curve of --epochs instead) and a resume with more epochs that jumps the lr
    # back up instead of stretching the tail from where it was.
    optimizer = build_optimizer(small_model(), "sgd", lr=1.0)
    schedule = build_scheduler(optimizer, "cosine", epochs=50, steps_per_epoch=2)
    for _ in range(2):
        schedule.step_iteration()
    schedule.plan_epochs(4)
    schedule.step_iteration()
    state = json.loads(json.dumps(schedule.state_dict(), allow_nan=False))
    expected = [schedule.current_lr()]
    for _ in range(3):
        schedule.step_iteration()
        expected.append(schedule.current_lr())
    resumed = build_scheduler(
        build_optimizer(small_model(), "sgd", lr=1.0), "cosine", epochs=50, steps_per_epoch=2
    )
    resumed.load_state_dict(state)
    resumed.plan_epochs(4)  # what the trainer does on resume; same end, so no change
    got = [resumed.current_lr()]
    for _ in range(3):
        resumed.step_iteration()
        got.append(resumed.current_lr())
    assert got == pytest.approx(expected, abs=1e-12)
    extended = build_scheduler(
        build_optimizer(small_model(), "sgd", lr=1.0), "cosine", epochs=50, steps_per_epoch=2
    )
    extended.load_state_dict(state)
    extended.plan_epochs(6)
    assert extended.current_lr() == pytest.approx(expected[0])
    extended.step_iteration()
    assert expected[1] < extended.current_lr() < expected[0]


def test_scheduler_usage_errors():
    optimizer = build_optimizer(small_model(), "sgd", lr=1.0)
    with pytest.raises(UsageError, match="valid: " + ", ".join(SCHEDULERS)):
        build_scheduler(optimizer, "onecycle", epochs=1, steps_per_epoch=1)
    with pytest.raises(UsageError, match="`warmup_epochs`"):
        build_scheduler(optimizer, "poly", epochs=1, steps_per_epoch=1, warmup_epochs=-1)
