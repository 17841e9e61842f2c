import json
import math

import pytest
import torch
import torch.distributed as dist
from torchmetrics.classification import (
    BinaryF1Score,
    BinaryJaccardIndex,
    MulticlassF1Score,
    MulticlassJaccardIndex,
)

from segcli.infer.inference import labels_from_logits
from segcli.metrics import ConfusionMatrix

IGNORE = 255
nan = math.nan


def assert_same(actual: list[float], expected: list[float]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert (math.isnan(a) and math.isnan(e)) or a == pytest.approx(e)


def test_hand_computed_matrix_and_scores():
    target = torch.tensor([[[0, 0, 1, 1, IGNORE, 1, 0]]])
    preds = torch.tensor([[[0, 1, 1, 2, 3, 1, 0]]])
    cm = ConfusionMatrix(4)
    cm.update(preds, target)
    assert cm.matrix.tolist() == [[2, 1, 0, 0], [0, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    r = cm.compute()
    # class 0: TP 2 FP 0 FN 1; class 1: TP 2 FP 1 FN 1; class 2: FP 1; class 3: nothing.
    assert_same(r["iou"], [2 / 3, 2 / 4, 0.0, nan])
    assert_same(r["dice"], [4 / 5, 4 / 6, 0.0, nan])
    assert_same(r["acc"], [2 / 3, 2 / 3, nan, nan])
    assert_same(r["recall"], r["acc"])
    assert_same(r["precision"], [1.0, 2 / 3, 0.0, nan])
    assert r["miou"] == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert r["mdice"] == pytest.approx((4 / 5 + 4 / 6 + 0) / 3)
    assert r["pixel_acc"] == pytest.approx(4 / 6)
    assert "fg_iou" not in r


def test_logits_are_argmaxed_like_int_predictions():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 4, 5), torch.randint(0, 3, (2, 4, 5))
    a, b = ConfusionMatrix(3), ConfusionMatrix(3)
    a.update(logits, target)
    b.update(logits.argmax(1), target)
    assert torch.equal(a.matrix, b.matrix)
    assert a.matrix.dtype == torch.int64 and int(a.matrix.sum()) == target.numel()


def random_batches(num_classes: int, seed: int):
    """Batches where the last class never occurs, the second-to-last is only ever predicted,
    and about 20% of pixels are ignored."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(3):
        target = torch.randint(0, num_classes - 2, (2, 8, 8), generator=generator)
        preds = torch.randint(0, num_classes - 1, (2, 8, 8), generator=generator)
        ignored = torch.rand(2, 8, 8, generator=generator) < 0.2
        # Predictions of the absent class at ignored pixels must not make it count.
        preds = torch.where(ignored, num_classes - 1, preds)
        yield preds, torch.where(ignored, IGNORE, target)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_torchmetrics_macro_jaccard_and_f1(seed):
    k = 5
    cm = ConfusionMatrix(k)
    jaccard = MulticlassJaccardIndex(k, average="macro", ignore_index=IGNORE)
    f1 = MulticlassF1Score(k, average="macro", multidim_average="global", ignore_index=IGNORE)
    jaccard_each = MulticlassJaccardIndex(k, average="none", ignore_index=IGNORE)
    f1_each = MulticlassF1Score(k, average="none", multidim_average="global", ignore_index=IGNORE)
    for preds, target in random_batches(k, seed):
        cm.update(preds, target)
        for metric in (jaccard, f1, jaccard_each, f1_each):
            metric.update(preds, target)
    r = cm.compute()
    assert math.isnan(r["iou"][k - 1]) and r["iou"][k - 2] == 0.0
    assert r["miou"] == pytest.approx(jaccard.compute().item(), abs=1e-6)
    assert r["mdice"] == pytest.approx(f1.compute().item(), abs=1e-6)
    # Per class, torchmetrics reports 0 where TP+FP+FN = 0 (its zero_division); we report NaN.
    # Its macro averages drop exactly those classes, which is our NaN-ignoring mean.
    for ours, theirs in ((r["iou"], jaccard_each.compute()), (r["dice"], f1_each.compute())):
        masked = [nan if math.isnan(a) else b for a, b in zip(ours, theirs.tolist(), strict=True)]
        assert_same(ours, masked)
        assert [math.isnan(a) for a in ours] == [False] * (k - 1) + [True]
        assert theirs[k - 1].item() == 0.0


def test_binary_one_logit_scores_two_classes_and_foreground():
    torch.manual_seed(3)
    logits = torch.randn(2, 1, 6, 6)
    target = torch.randint(0, 2, (2, 6, 6))
    target[0, 0] = IGNORE
    cm = ConfusionMatrix(2)
    cm.update(logits, target)
    r = cm.compute()
    probs = logits[:, 0].sigmoid()
    fg_iou = BinaryJaccardIndex(threshold=0.5, ignore_index=IGNORE)(probs, target)
    fg_dice = BinaryF1Score(threshold=0.5, ignore_index=IGNORE)(probs, target)
    assert r["fg_iou"] == pytest.approx(fg_iou.item()) == r["iou"][1]
    assert r["fg_dice"] == pytest.approx(fg_dice.item()) == r["dice"][1]
    miou = MulticlassJaccardIndex(2, ignore_index=IGNORE)((logits[:, 0] > 0).long(), target)
    assert r["miou"] == pytest.approx(miou.item())


def test_a_logit_of_exactly_zero_is_background_as_in_predict():
    # Catches the metric thresholding a one-logit model at >= 0 while predict uses sigmoid >
    # 0.5: a pixel at probability 0.5 would be foreground in the score, background in the mask.
    logits = torch.tensor([0.0, 1e-6, -1e-6]).reshape(1, 1, 1, 3)
    cm = ConfusionMatrix(2)
    cm.update(logits, torch.zeros(1, 1, 3, dtype=torch.long))
    assert cm.matrix.tolist() == [[2, 1], [0, 0]]
    assert labels_from_logits(logits).tolist() == [[[0, 1, 0]]]


def test_scores_are_exact_past_float32_counts():
    # Catches scores computed in float32: per-class counts pass 2**24 (16.7 M pixels, sixteen
    # 1024x1024 masks) on any real validation set, and float32 rounds them.
    cm = ConfusionMatrix(2)
    cm.matrix += torch.tensor([[2**24 + 1, 1], [0, 1]])
    scores = cm.compute()
    assert scores["iou"][0] == pytest.approx((2**24 + 1) / (2**24 + 2), rel=1e-12, abs=0)
    assert scores["pixel_acc"] == pytest.approx((2**24 + 2) / (2**24 + 3), rel=1e-12, abs=0)


def test_ignore_index_has_no_effect():
    torch.manual_seed(4)
    preds, target = torch.randint(0, 3, (1, 5, 5)), torch.randint(0, 3, (1, 5, 5))
    with_ignored = ConfusionMatrix(3)
    with_ignored.update(
        torch.cat([preds, torch.randint(0, 3, (1, 5, 5))], 2),
        torch.cat([target, torch.full((1, 5, 5), IGNORE)], 2),
    )
    plain = ConfusionMatrix(3)
    plain.update(preds, target)
    assert torch.equal(with_ignored.matrix, plain.matrix)


def test_accumulates_counts_not_batch_means_and_merges():
    batches = list(random_batches(4, seed=5))
    whole, parts = ConfusionMatrix(4), [ConfusionMatrix(4) for _ in batches]
    whole.update(torch.cat([p for p, _ in batches]), torch.cat([t for _, t in batches]))
    for part, (preds, target) in zip(parts, batches, strict=True):
        part.update(preds, target)
    merged = ConfusionMatrix(4)
    for part in parts:
        merged.merge(part)
    assert torch.equal(merged.matrix, whole.matrix)
    merged.reset()
    assert int(merged.matrix.sum()) == 0


def test_all_empty_gives_nan_and_json_gives_null():
    cm = ConfusionMatrix(2)
    cm.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), IGNORE))
    r = cm.compute()
    assert math.isnan(r["miou"]) and math.isnan(r["pixel_acc"]) and math.isnan(r["fg_iou"])
    document = json.dumps(cm.to_json(), allow_nan=False)
    assert json.loads(document)["iou"] == [None, None]


def test_invalid_inputs_raise_saying_what_is_wrong():
    # Catches a wrong input counted instead of refused, or refused with a message that does
    # not say which shape or range was expected.
    cm = ConfusionMatrix(3)
    target = torch.zeros(1, 2, 2, dtype=torch.long)
    cases = [
        (torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 3), "outside 0..2"),
        (torch.full((1, 2, 2), 3), target, r"class indices in 0\.\.2"),
        (torch.randn(1, 4, 2, 2), target, "logits have 4 classes, expected 3"),
        (torch.randn(1, 1, 2, 2), target, "one-logit outputs are scored as 2 classes"),
        (torch.randn(4, 2, 2), target, r"logits must be N x C x H x W, got \(4, 2, 2\)"),
        (torch.zeros(2, 2, dtype=torch.long), target, r"predictions must be N x H x W"),
        (torch.zeros(1, 3, 3, dtype=torch.long), target, r"predictions \(1, 3, 3\) and target"),
    ]
    for preds, truth, message in cases:
        with pytest.raises(ValueError, match=message):
            cm.update(preds, truth)
    assert int(cm.matrix.sum()) == 0
    with pytest.raises(ValueError, match="at least 2 scored classes, got 1"):
        ConfusionMatrix(1)
    for other in (ConfusionMatrix(4), ConfusionMatrix(3, ignore_index=0)):
        with pytest.raises(ValueError, match="different classes/ignore_index"):
            cm.merge(other)


def test_json_keeps_every_defined_score_and_nulls_only_the_undefined():
    # Catches a JSON conversion that nulls defined values (or keeps NaN, which strict JSON
    # refuses): class 2 never occurs, classes 0 and 1 have hand-computed scores.
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([[[0, 0, 1, 1]]]), torch.tensor([[[0, 1, 1, 1]]]))
    document = json.loads(json.dumps(cm.to_json(), allow_nan=False))
    assert document["iou"] == [pytest.approx(1 / 2), pytest.approx(2 / 3), None]
    assert document["precision"] == [pytest.approx(1 / 2), 1.0, None]
    assert document["recall"] == [1.0, pytest.approx(2 / 3), None]
    assert document["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert document["pixel_acc"] == pytest.approx(3 / 4)


def _reduce_on_rank(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        cm = ConfusionMatrix(3)
        cm.update(torch.tensor([[[rank, 2, 1]]]), torch.tensor([[[0, 2, rank]]]))
        cm.all_reduce()
        torch.save(cm.matrix, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_the_matrices_of_two_ranks(tmp_path):
    # Catches an all_reduce that averages, keeps one rank's matrix or casts to float: each of
    # two gloo processes must end with the sum of both ranks' counts, as one process sees them.
    import torch.multiprocessing as mp

    single = ConfusionMatrix(3)
    single.all_reduce()  # no process group: a no-op
    for rank in range(2):
        single.update(torch.tensor([[[rank, 2, 1]]]), torch.tensor([[[0, 2, rank]]]))
    mp.spawn(_reduce_on_rank, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        reduced = torch.load(tmp_path / f"{rank}.pt")
        assert reduced.dtype == torch.int64 and torch.equal(reduced, single.matrix)


def test_uint8_targets_do_not_overflow():
    cm = ConfusionMatrix(20)
    cm.update(torch.tensor([[[19, 3]]]), torch.tensor([[[19, IGNORE]]], dtype=torch.uint8))
    assert int(cm.matrix[19, 19]) == 1 and int(cm.matrix.sum()) == 1
