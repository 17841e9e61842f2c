import math

import pytest
import torch
import torch.nn.functional as F

from segcli.errors import UsageError
from segcli.losses import LOSS_NAMES, build_loss, median_frequency_weights

IGNORE = 255
MULTICLASS = ("ce", "wce", "focal", "ohem", "dice", "jaccard", "tversky", "lovasz")
BINARY = LOSS_NAMES


def make(spec: str, num_classes: int, **kwargs):
    if "wce" in spec:
        kwargs.setdefault("class_weights", [1.0 + c for c in range(max(num_classes, 2))])
    return build_loss(spec, num_classes=num_classes, ignore_index=IGNORE, **kwargs)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def binary_input(probs: list[float], target: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.tensor([logit(p) for p in probs]).reshape(1, 1, 1, -1)
    return logits, torch.tensor(target).reshape(1, 1, -1)


# Hand-computed values


def test_ce_hand_value_and_ignored_pixel():
    # softmax([0, ln 3]) = [1/4, 3/4]; the second pixel is ignored.
    logits = torch.tensor([[0.0, math.log(3)], [5.0, -5.0]]).T.reshape(1, 2, 1, 2)
    target = torch.tensor([[[1, IGNORE]]])
    assert make("ce", 2)(logits, target).item() == pytest.approx(-math.log(0.75), rel=1e-6)


def test_bce_hand_value():
    logits, target = binary_input([0.5, 0.8], [1, 0])
    expected = (math.log(2) - math.log(0.2)) / 2
    assert make("bce", 1)(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert make("ce", 1)(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_wce_hand_value_matches_torch_weighted_mean():
    logits = torch.tensor([[0.0, math.log(3)], [math.log(3), 0.0]]).T.reshape(1, 2, 1, 2)
    target = torch.tensor([[[1, 1]]])
    # pixel losses -ln(3/4) and -ln(1/4), both class 1 with weight 2: the weighted mean.
    expected = (-math.log(0.75) - math.log(0.25)) / 2
    loss = make("wce", 2, class_weights=[1.0, 2.0])(logits, target).item()
    assert loss == pytest.approx(expected, rel=1e-6)
    torch.manual_seed(0)
    x, t = torch.randn(2, 3, 4, 5), torch.randint(0, 3, (2, 4, 5))
    t[0, 0] = IGNORE
    weights = [0.5, 2.0, 5.0]
    reference = F.cross_entropy(x, t, weight=torch.tensor(weights), ignore_index=IGNORE)
    assert make("wce", 3, class_weights=weights)(x, t).item() == pytest.approx(reference.item())


def test_soft_region_losses_hand_values():
    logits, target = binary_input([0.75, 0.5], [1, 0])
    # I = 0.75, sum p = 1.25, |T| = 1, FP = 0.5, FN = 0.25
    assert make("dice", 1)(logits, target).item() == pytest.approx(1 - 1.5 / 2.25, rel=1e-5)
    assert make("jaccard", 1)(logits, target).item() == pytest.approx(1 - 0.75 / 1.5, rel=1e-5)
    tversky = make("tversky", 1, tversky_alpha=0.3, tversky_beta=0.7)(logits, target)
    assert tversky.item() == pytest.approx(1 - 0.75 / (0.75 + 0.15 + 0.175), rel=1e-5)


def test_multiclass_dice_hand_value_with_an_ignored_pixel_and_an_absent_class():
    # Worked by hand, independent of any one-hot code: softmax probabilities set exactly by
    # log-probability logits. Pixel 1 (class 0): p = .7/.2/.1; pixel 2 (class 1): .1/.6/.3;
    # pixel 3 is ignored (its p = .1/.1/.8 must count nowhere). Class 0: I = .7, sum p = .8,
    # |T| = 1 -> dice 1.4/1.8; class 1: I = .6, sum p = .8 -> 1.2/1.8; class 2 is neither in
    # the target nor predicted -> left out. Loss = ((1 - 14/18) + (1 - 12/18)) / 2 = 5/18.
    probabilities = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.1, 0.1, 0.8]])
    logits = probabilities.log().T.reshape(1, 3, 1, 3)
    target = torch.tensor([[[0, 1, IGNORE]]])
    assert make("dice", 3)(logits, target).item() == pytest.approx(5 / 18, rel=1e-5)


def test_focal_hand_value_with_alpha():
    logits, target = binary_input([0.75, 0.4], [1, 0])
    fg = 0.25 * 0.25**2 * -math.log(0.75)
    bg = 0.75 * 0.4**2 * -math.log(0.6)
    loss = make("focal", 1, focal_gamma=2, focal_alpha=0.25)(logits, target)
    assert loss.item() == pytest.approx((fg + bg) / 2, rel=1e-5)


def test_ohem_averages_the_pixels_below_the_probability_threshold():
    # Target probabilities 0.5, 0.6 and 0.65 are below 0.7; the 13 others (0.9) are easy and
    # an ignored pixel (0.1) is hard but must not count. Catches easy pixels left in the mean,
    # a threshold applied to the wrong side, or ignored pixels counted as hard.
    probs = [0.5, 0.6, 0.65] + [0.9] * 13 + [0.1]
    logits, target = binary_input(probs, [1] * 16 + [IGNORE])
    expected = -(math.log(0.5) + math.log(0.6) + math.log(0.65)) / 3
    assert make("ohem", 1)(logits, target).item() == pytest.approx(expected, rel=1e-5)


def test_ohem_keeps_the_hardest_sixteenth_when_too_few_pixels_are_hard():
    # 32 valid pixels, none below 0.7: the hardest ceil(32 / 16) = 2 (0.75 and 0.8) are kept.
    # Catches an empty selection (a zero or NaN loss that stops learning late in training).
    probs = [0.75, 0.8] + [0.95] * 30
    logits, target = binary_input(probs, [1] * 32)
    expected = -(math.log(0.75) + math.log(0.8)) / 2
    assert make("ohem", 1)(logits, target).item() == pytest.approx(expected, rel=1e-5)


def test_lovasz_hinge_hand_value():
    # errors 1 - x*sign = [0.5, 1.2]; sorted [1.2 (bg), 0.5 (fg)]; Lovász gradient [0.5, 0.5].
    logits = torch.tensor([0.5, 0.2]).reshape(1, 1, 1, 2)
    target = torch.tensor([[[1, 0]]])
    assert make("lovasz", 1)(logits, target).item() == pytest.approx(0.85, rel=1e-6)


def test_lovasz_softmax_hand_value():
    # One pixel of class 0 with p = [0.7, 0.3]: class 0 error 0.3; class 1 is absent from
    # target and prediction and is left out.
    logits = torch.tensor([math.log(0.7), math.log(0.3)]).reshape(1, 2, 1, 1)
    target = torch.zeros(1, 1, 1, dtype=torch.long)
    assert make("lovasz", 2)(logits, target).item() == pytest.approx(0.3, rel=1e-6)


# Reference equalities


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lovasz_softmax_at_hard_predictions_is_one_minus_iou(seed):
    # The Lovász extension equals the set function on the cube's vertices: with (nearly)
    # one-hot probabilities, Lovász-softmax is the mean of 1 - IoU over the classes present in
    # target or prediction, counted from the hard masks (an independent reference). Catches a
    # sort in the wrong order, a wrong Lovász gradient, or present classes skipped.
    generator = torch.Generator().manual_seed(seed)
    # Classes 0, 1, 3 in both; 2 in neither (skipped, with classes after it still counted);
    # 4 only in the target and 5 only in the prediction (both counted, IoU 0).
    prediction = torch.tensor([0, 1, 3])[torch.randint(0, 3, (2, 5, 6), generator=generator)]
    target = torch.tensor([0, 1, 3])[torch.randint(0, 3, (2, 5, 6), generator=generator)]
    target[0, 0, 0] = 4
    prediction[1, 4, 5] = 5
    logits = F.one_hot(prediction, 6).permute(0, 3, 1, 2).float() * 60.0
    ious = []
    for c in range(6):
        hit, truth = prediction == c, target == c
        union = (hit | truth).sum().item()
        if union:
            ious.append((hit & truth).sum().item() / union)
    expected = 1 - sum(ious) / len(ious)
    assert make("lovasz", 6)(logits, target).item() == pytest.approx(expected, abs=1e-5)


def test_binary_foreground_counts_when_only_predicted_or_only_one_pixel_labelled():
    # Catches the one-logit "present" rule written as target AND prediction, or as more than
    # one pixel, or counting an ignored pixel's prediction: an all-background target with one
    # pixel predicted foreground, and one labelled pixel never predicted, each give a
    # foreground Dice of 0 (loss 1); foreground predicted only on an ignored pixel is absent.
    logits, target = binary_input([0.2, 0.9, 0.1], [0, 0, 0])
    assert make("dice", 1)(logits, target).item() == pytest.approx(1.0, abs=1e-6)
    logits, target = binary_input([0.3, 0.4, 0.9], [0, 0, IGNORE])
    assert make("dice", 1)(logits, target).item() == pytest.approx(0.0, abs=1e-6)
    logits, target = binary_input([0.2, 0.3, 0.1], [0, 1, 0])
    expected = 1 - 2 * 0.3 / (0.2 + 0.3 + 0.1 + 1)
    assert make("dice", 1)(logits, target).item() == pytest.approx(expected, rel=1e-6)
    logits, target = binary_input([0.2, 0.3], [0, 0])  # nothing labelled, nothing predicted
    assert make("dice", 1)(logits, target).item() == pytest.approx(0.0, abs=1e-6)


def test_a_class_of_one_missed_pixel_counts_as_present():
    # Catches "present" tested as more than one pixel: class 1 has a single target pixel and is
    # never predicted, so its Dice is 0 and it weighs in the mean.
    logits = torch.tensor([[4.0, 4.0, 4.0], [0.0, 0.0, 0.0]]).reshape(1, 2, 1, 3)
    target = torch.tensor([[[0, 0, 1]]])
    probs = logits.softmax(1)[0, :, 0]
    dice0 = 2 * probs[0, :2].sum() / (probs[0].sum() + 2)
    dice1 = 2 * probs[1, 2] / (probs[1].sum() + 1)
    expected = 1 - (dice0 + dice1).item() / 2
    assert make("dice", 2)(logits, target).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("num_classes", [1, 4])
def test_focal_gamma_zero_equals_cross_entropy(num_classes):
    torch.manual_seed(1)
    x = torch.randn(2, num_classes, 5, 6) * 3
    t = torch.randint(0, max(num_classes, 2), (2, 5, 6))
    t[:, 0] = IGNORE
    focal = make("focal", num_classes, focal_gamma=0.0)(x, t)
    if num_classes == 1:
        valid = t != IGNORE
        reference = F.binary_cross_entropy_with_logits(x[:, 0][valid], t[valid].float())
    else:
        reference = F.cross_entropy(x, t, ignore_index=IGNORE)
    torch.testing.assert_close(focal, reference)


def one_hot_reference(x, t, kind, include_background=True, alpha=0.5, beta=0.5):
    """Soft region loss the textbook way: float64 softmax times a one-hot target."""
    x = x.double()
    valid = (t != IGNORE).unsqueeze(1).double()
    probs = x.softmax(1) * valid
    one_hot = F.one_hot(torch.where(t == IGNORE, 0, t), x.shape[1]).permute(0, 3, 1, 2) * valid
    inter = (probs * one_hot).sum((0, 2, 3))
    mass, count = probs.sum((0, 2, 3)), one_hot.sum((0, 2, 3))
    predicted = F.one_hot(x.argmax(1), x.shape[1]).permute(0, 3, 1, 2) * valid
    present = (count > 0) | (predicted.sum((0, 2, 3)) > 0)
    if not include_background:
        present[0] = False
    if kind == "dice":
        score = 2 * inter / (mass + count)
    elif kind == "jaccard":
        score = inter / (mass + count - inter)
    else:
        score = inter / (inter + alpha * (mass - inter) + beta * (count - inter))
    return (1 - score[present]).mean()


@pytest.mark.parametrize("kind", ["dice", "jaccard", "tversky"])
@pytest.mark.parametrize("include_background", [True, False])
def test_region_losses_equal_one_hot_reference(kind, include_background):
    torch.manual_seed(2)
    x = torch.randn(3, 5, 6, 7) * 2
    t = torch.randint(0, 4, (3, 6, 7))  # class 4 never in the target
    t[0, :2] = IGNORE
    loss = make(
        kind,
        5,
        dice_include_background=include_background,
        tversky_alpha=0.3,
        tversky_beta=0.7,
    )(x, t)
    reference = one_hot_reference(x, t, kind, include_background, 0.3, 0.7)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6, abs=1e-7)


def test_tversky_half_half_is_dice():
    torch.manual_seed(3)
    x, t = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    torch.testing.assert_close(make("tversky", 3)(x, t), make("dice", 3)(x, t))


def test_absent_classes_do_not_count_as_perfect():
    # Class 2 is in neither target nor prediction: Dice averages classes 0 and 1 only.
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 2.0, -1.0]]).T.reshape(1, 3, 1, 2)
    target = torch.tensor([[[0, 0]]])
    probs = logits.softmax(1)[0, :, 0]  # class x pixel
    dice0 = 2 * probs[0].sum() / (probs[0].sum() + 2)
    dice1 = 0.0  # predicted at pixel 2 but absent from the target
    expected = 1 - (dice0.item() + dice1) / 2
    assert make("dice", 3)(logits, target).item() == pytest.approx(expected, rel=1e-6)


# Perfect predictions, ignore_index, extreme logits


@pytest.mark.parametrize("kind", ["dice", "jaccard", "tversky", "lovasz"])
@pytest.mark.parametrize("num_classes", [1, 4])
def test_perfect_prediction_gives_zero(kind, num_classes):
    torch.manual_seed(4)
    t = torch.randint(0, 3 if num_classes > 1 else 2, (2, 5, 5))  # class 3 absent
    if num_classes == 1:
        x = (t.float() * 2 - 1).unsqueeze(1) * 50
    else:
        x = F.one_hot(t, num_classes).permute(0, 3, 1, 2).float() * 50
    t[0, 0] = IGNORE
    loss = make(kind, num_classes)(x, t)
    if kind == "lovasz" and num_classes == 1:
        assert loss.item() == 0  # hinge: every margin is beyond 1
    else:
        assert loss.item() == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize(
    ("spec", "num_classes"),
    [(s, 4) for s in MULTICLASS] + [(s, 1) for s in BINARY] + [("0.5*focal+dice", 4)],
)
def test_ignored_pixels_have_no_effect(spec, num_classes):
    torch.manual_seed(5)
    x = torch.randn(2, num_classes, 6, 6) * 3
    t = torch.randint(0, max(num_classes, 2), (2, 6, 6))
    ignored = torch.rand(2, 6, 6) < 0.3
    t_ignored = torch.where(ignored, IGNORE, t)
    # Different logits at ignored pixels must not change the loss, nor receive gradient.
    x_other = torch.where(ignored.unsqueeze(1), torch.randn_like(x) * 10, x).requires_grad_()
    loss_fn = make(spec, num_classes)
    a = loss_fn(x, t_ignored)
    b = loss_fn(x_other, t_ignored)
    torch.testing.assert_close(a, b)
    b.backward()
    assert x_other.grad[ignored.unsqueeze(1).expand_as(x)].abs().max() == 0


@pytest.mark.parametrize(
    ("spec", "num_classes"), [(s, 4) for s in MULTICLASS] + [(s, 1) for s in BINARY]
)
def test_all_ignored_batch_gives_zero_not_nan(spec, num_classes):
    x = torch.randn(1, num_classes, 3, 3, requires_grad=True)
    loss = make(spec, num_classes)(x, torch.full((1, 3, 3), IGNORE))
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize(
    ("spec", "num_classes"),
    [(s, 4) for s in MULTICLASS] + [(s, 1) for s in BINARY] + [("focal", 4)],
)
def test_finite_loss_and_gradients_at_extreme_logits(spec, num_classes):
    torch.manual_seed(6)
    signs = torch.randint(0, 2, (2, num_classes, 5, 5)).float() * 2 - 1
    x = (signs * 1e4).requires_grad_()
    t = torch.randint(0, max(num_classes, 2), (2, 5, 5))
    t[0, 0] = IGNORE
    for gamma in (2.0, 0.5):
        loss = make(spec, num_classes, focal_gamma=gamma)(x, t)
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("num_classes", [1, 4])
def test_bf16_logits_under_autocast(num_classes):
    torch.manual_seed(7)
    x = torch.randn(2, num_classes, 4, 4)
    t = torch.randint(0, max(num_classes, 2), (2, 4, 4))
    loss_fn = make("dice+ce+lovasz", num_classes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = loss_fn(x.bfloat16(), t)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(loss_fn(x.bfloat16().float(), t).item(), rel=1e-6)


# Spec parsing and construction


def test_joint_loss_is_weighted_sum_and_describes_itself():
    torch.manual_seed(8)
    x, t = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    joint = make("0.5*focal+dice", 3)
    assert joint.describe() == str(joint) == "0.5*focal+1*dice"
    expected = 0.5 * make("focal", 3)(x, t) + make("dice", 3)(x, t)
    torch.testing.assert_close(joint(x, t), expected)
    assert make(" Dice + CE ", 3).describe() == "1*dice+1*ce"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "foo",
            "unknown loss 'foo'; valid: ce, wce, focal, ohem, dice, bce, jaccard, tversky, lovasz",
        ),
        ("dice+", "malformed"),
        ("x*dice", "bad weight"),
        ("-1*dice", "bad weight"),
        ("0*dice", "bad weight"),
        ("dice+dice", "twice"),
    ],
)
def test_bad_specs_are_usage_errors(spec, message):
    with pytest.raises(UsageError, match=message) as error:
        make(spec, 3)
    assert str(error.value).startswith("`loss`") and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("logits_shape", "target_shape"),
    [((2, 3, 4, 4), (3, 4, 4)), ((3, 4, 4), (2, 4, 4)), ((2, 3, 4, 4), (2, 1, 4, 4))],
)
def test_mismatched_logits_and_target_are_refused_naming_both_shapes(logits_shape, target_shape):
    # Catches a shape check that lets a batch-size mismatch or a 3-D logits tensor through
    # (the loss would broadcast or gather garbage) or an error without the two shapes.
    loss_fn = make("ce+dice", 3)
    with pytest.raises(ValueError) as raised:
        loss_fn(torch.zeros(logits_shape), torch.zeros(target_shape, dtype=torch.long))
    assert f"got {logits_shape} and {target_shape}" in str(raised.value)


def test_build_loss_defaults_ignore_255_and_focus_with_gamma_two():
    # Catches the library defaults drifting from what the CLI documents: ignore index 255
    # and focal gamma 2 (a Python API user who passes neither relies on both).
    logits, target = binary_input([0.75, 0.4, 0.9], [1, 0, 255])
    fg = 0.25**2 * -math.log(0.75)
    bg = 0.4**2 * -math.log(0.6)
    loss = build_loss("focal", num_classes=1)(logits, target)
    assert loss.item() == pytest.approx((fg + bg) / 2, rel=1e-5)


def test_cross_entropy_terms_describe_themselves_by_their_own_names():
    # Catches bce or wce logged (and stored in the run's config) under another name.
    assert make("bce", 1).describe() == "1*bce"
    assert make("0.5*wce+dice", 3).describe() == "0.5*wce+1*dice"


def test_construction_errors():
    with pytest.raises(UsageError, match="one-logit"):
        make("bce", 3)
    with pytest.raises(UsageError, match="`class_weights`"):
        build_loss("wce", num_classes=3)
    with pytest.raises(UsageError, match="needs 3"):
        build_loss("wce", num_classes=3, class_weights=[1, 2])
    with pytest.raises(UsageError, match="needs 2"):
        build_loss("wce", num_classes=1, class_weights=[1])
    with pytest.raises(UsageError, match="at least 1 output channel, got 0"):
        build_loss("ce", num_classes=0)


def test_settings_at_their_limits_are_accepted_and_past_them_refused():
    # Catches validity ranges drawn one step too tight or too loose: focal alpha is a weight in
    # [0, 1]; Tversky's alpha and beta may each be 0 but not both; class weights are finite and
    # non-negative (0 is what --class-weights auto gives a class with no pixels).
    for alpha in (0.0, 1.0):
        make("focal", 3, focal_alpha=alpha)
    for alpha in (-0.1, 1.5):
        with pytest.raises(UsageError, match="`focal_alpha`"):
            make("focal", 3, focal_alpha=alpha)
    for alpha, beta in ((0.0, 1.0), (1.0, 0.0)):
        make("tversky", 3, tversky_alpha=alpha, tversky_beta=beta)
    for alpha, beta in ((0.0, 0.0), (-0.5, 1.0), (1.0, -0.5)):
        with pytest.raises(UsageError, match="must be >= 0 and not both 0"):
            make("tversky", 3, tversky_alpha=alpha, tversky_beta=beta)
    build_loss("wce", num_classes=2, ignore_index=IGNORE, class_weights=[1.0, 0.0])
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(UsageError, match="`class_weights` needs 2 non-negative numbers"):
            build_loss("wce", num_classes=2, ignore_index=IGNORE, class_weights=[1.0, bad])
    with pytest.raises(UsageError, match="`focal_gamma` must be >= 0"):
        make("focal", 3, focal_gamma=-1.0)


def test_median_frequency_weights_of_a_single_labelled_pixel():
    assert median_frequency_weights([1, 0]) == [1.0, 0.0]


def test_median_frequency_weights():
    # frequencies 100/160, 50/160, 10/160; median 50/160; an empty class gets 0.
    assert median_frequency_weights([100, 50, 10, 0]) == pytest.approx([0.5, 1.0, 5.0, 0.0])
    with pytest.raises(UsageError, match="`class_weights` auto: the training masks contain no"):
        median_frequency_weights([0, 0])
