"""Batched per-sample augmentation (device pipeline) against torchvision, and its distributions.

Tolerance: every batched operation equals torchvision.transforms.v2.functional on the same float
image within 1e-5 absolute (images in [0, 1]; the observed gap is float rounding, ~1e-6), and a
whole view (jitter in random order, grayscale, blur, flip, normalise) within 1e-4 after
normalisation (division by std ~0.22 scales the rounding up).
"""

import math

import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision.transforms import RandomResizedCrop as torchvision_rrc
from torchvision.transforms import functional as TF1
from torchvision.transforms.v2 import functional as TF

from mcl_det.pretrain import augment as A
from mcl_det.pretrain.data import CropViews, TwoCrops, moco_v2_transform

OP_TOL = 1e-5
VIEW_TOL = 1e-4


def _images(n=6, h=37, w=45, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h, w, generator=g)
    x[0] = x[0, :1]  # a gray image: hue/saturation must not divide by zero
    x[1, :, :5] = 1.0  # saturated pixels: the clamps matter
    return x


def _check(batched, reference, factors):
    for i, f in enumerate(factors):
        ref = reference(i, float(f))
        assert (batched[i] - ref).abs().max() <= OP_TOL, (i, float(f))


@pytest.mark.parametrize(
    "name, ours, theirs, lo, hi",
    [
        ("brightness", A.adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
        ("contrast", A.adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
        ("saturation", A.adjust_saturation, TF.adjust_saturation, 0.6, 1.4),
        ("hue", A.adjust_hue, TF.adjust_hue, -0.5, 0.5),
    ],
)
def test_jitter_ops_equal_torchvision(name, ours, theirs, lo, hi):
    x = _images()
    f = torch.linspace(lo, hi, len(x))
    _check(ours(x.clone(), f), lambda i, v: theirs(x[i], v), f)


@pytest.mark.parametrize("k", [3, 23])
def test_blur_equals_torchvision(k):
    x = _images(h=40, w=48)
    sigma = torch.tensor([0.1, 0.3, 0.7, 1.0, 1.6, 2.0])
    y = A.gaussian_blur(x, sigma, k)
    _check(y, lambda i, s: TF.gaussian_blur(x[i], [k, k], [s, s]), sigma)


def test_grayscale_normalize_flip_equal_torchvision():
    x = _images()
    assert (A.to_grayscale(x).expand_as(x) - TF.rgb_to_grayscale(x, 3)).abs().max() <= OP_TOL
    ref = TF.normalize(x, list(A.MEAN), list(A.STD))
    assert (A.normalize(x) - ref).abs().max() <= OP_TOL
    u8 = (x * 255).round().to(torch.uint8)
    assert torch.equal(A.to_unit_float(u8), TF.to_dtype(u8, torch.float32, scale=True))


def _params(n, recipe, seed=0):
    torch.manual_seed(seed)
    views = [A.draw_view_params((37, 45), recipe)[1] for _ in range(n)]
    return {k: torch.stack([v[k] for v in views]) for k in A.PARAM_KEYS}


def _reference_view(x, p, recipe):
    """One sample, one operation at a time with torchvision, in torchvision's order."""
    if bool(p["flip"]):
        x = TF.horizontal_flip(x)
    x = TF.to_dtype(x, torch.float32, scale=True)
    gray = bool(p["gray"])
    if recipe.gray_first and gray:
        x = TF.rgb_to_grayscale(x, 3)
    if bool(p["jitter"]):
        fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
        for op in p["order"].tolist():
            x = fns[op](x, float(p["factors"][op]))
    if not recipe.gray_first and gray:
        x = TF.rgb_to_grayscale(x, 3)
    if bool(p["blur"]):
        s = float(p["sigma"])
        x = TF.gaussian_blur(x, [recipe.blur_kernel] * 2, [s, s])
    return TF.normalize(x, list(A.MEAN), list(A.STD))


@pytest.mark.parametrize("aug", ["aug+", "aug"])
def test_augment_batch_equals_torchvision_one_sample_at_a_time(aug):
    recipe = A.moco_recipe(aug, 45)
    n = 24
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(n, 3, 45, 45, generator=g) * 255).to(torch.uint8)
    p = _params(n, recipe, seed=2)
    assert 0 < int(p["jitter"].sum()) and 0 < int(p["gray"].sum()) < n and 0 < int(p["flip"].sum())
    y = A.augment_batch(x, p, recipe)
    assert y.dtype == torch.float32 and y.shape == (n, 3, 45, 45)
    for i in range(n):
        ref = _reference_view(x[i], {k: v[i] for k, v in p.items()}, recipe)
        assert (y[i] - ref).abs().max() <= VIEW_TOL, i
    orders = {tuple(o) for o, j in zip(p["order"].tolist(), p["jitter"]) if j}
    assert len(orders) > 1  # samples of one batch really got different orders


def test_parameter_distributions_are_moco_v2_aug_plus():
    """4000 views from fixed seeds; bounds are >= 5 standard errors (deterministic, not flaky)."""
    n = 4000
    recipe = A.moco_recipe("aug+", 224)
    img = Image.new("RGB", (500, 375))  # the size of a typical ImageNet image
    torch.manual_seed(123)
    draws = [A.draw_view_params((375, 500), recipe) for _ in range(n)]
    boxes = torch.tensor([b for b, _ in draws], dtype=torch.float64)  # top, left, h, w
    p = {k: torch.stack([d[1][k] for d in draws]) for k in A.PARAM_KEYS}

    area = boxes[:, 2] * boxes[:, 3] / (500 * 375)
    log_ratio = torch.log(boxes[:, 3] / boxes[:, 2])
    assert area.min() >= 0.19 and area.max() <= 1.0  # 0.2 up to the integer rounding of the box
    assert log_ratio.abs().max() <= math.log(4 / 3) + 0.02
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 375).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= 500).all()
    # below area 0.56 no (scale, ratio) proposal is rejected on a 4:3 image, so there the scale
    # is U(0.2, 1) restricted to [0.2, 0.56] (large crops of extreme ratio are redrawn)
    small = area[(area > 0.21) & (area < 0.55)].numpy()
    assert stats.kstest(small, stats.uniform(0.21, 0.34).cdf).pvalue > 1e-3
    assert abs(float(log_ratio[area < 0.55].mean())) < 0.02  # symmetric in log(ratio)
    # and the whole joint law is torchvision's RandomResizedCrop(scale=(0.2, 1)) (other seeds)
    torch.manual_seed(7)
    rrc = torch.tensor(
        [torchvision_rrc.get_params(img, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(n)]
    ).double()
    ref_area = (rrc[:, 2] * rrc[:, 3] / (500 * 375)).numpy()
    assert stats.ks_2samp(area.numpy(), ref_area).pvalue > 1e-3

    for key, prob in (("jitter", 0.8), ("gray", 0.2), ("blur", 0.5), ("flip", 0.5)):
        se = math.sqrt(prob * (1 - prob) / n)
        assert abs(float(p[key].float().mean()) - prob) < 5 * se, key

    jit = p["jitter"]
    f = p["factors"][jit]
    for col, (lo, hi) in enumerate([(0.6, 1.4)] * 3 + [(-0.1, 0.1)]):
        v = f[:, col].double()
        assert v.min() >= lo and v.max() <= hi
        assert stats.kstest(v.numpy(), stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3
    assert (p["factors"][~jit] == torch.tensor([1.0, 1.0, 1.0, 0.0])).all()  # identity if off
    orders = [tuple(o) for o in p["order"][jit].tolist()]
    counts = torch.tensor([orders.count(o) for o in set(orders)], dtype=torch.float64)
    assert len(counts) == 24  # every order of brightness/contrast/saturation/hue occurs
    assert stats.chisquare(counts.numpy()).pvalue > 1e-3  # ... equally often

    sig = p["sigma"][p["blur"]].double()
    assert sig.min() >= 0.1 and sig.max() <= 2.0
    assert stats.kstest(sig.numpy(), stats.uniform(0.1, 1.9).cdf).pvalue > 1e-3
    assert (p["sigma"][~p["blur"]] == 0).all()


def _jpeg(tmp_path, seed=0, size=(64, 48)):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(3, 6, 8, generator=g)
    img = torch.nn.functional.interpolate(base[None], size=size[::-1], mode="bilinear")[0]
    img = (img * 255).to(torch.uint8)
    path = tmp_path / f"im{seed}.jpg"
    TF1.to_pil_image(img).save(path, quality=95)
    return path


@pytest.mark.parametrize("aug", ["aug+", "aug"])
def test_same_random_decisions_as_the_pil_pipeline(tmp_path, aug):
    """Same seed -> same crops, jitter, grayscale, blur, flip as the PIL chain: the views differ
    only by PIL's resize and uint8 rounding between operations (its hue is quantised the most)."""
    img = Image.open(_jpeg(tmp_path)).convert("RGB")
    recipe = A.moco_recipe(aug, 32)
    for seed in range(12):
        torch.manual_seed(seed)
        old = TwoCrops(moco_v2_transform(32, aug))(img)
        torch.manual_seed(seed)
        views = CropViews(recipe)(TF1.pil_to_tensor(img))
        for ref, (u8, p) in zip(old, views):
            assert u8.dtype == torch.uint8 and u8.shape == (3, 32, 32)
            new = A.augment_batch(u8[None], {k: v[None] for k, v in p.items()}, recipe)[0]
            gap = (new - ref).abs()
            assert float(gap.mean()) < 0.06 and float(gap.max()) < 0.4, (seed, float(gap.max()))


def test_recipe_numbers():
    r = A.moco_recipe("aug+", 224)
    assert r.blur_kernel == 23 and r.sigma == (0.1, 2.0) and r.jitter == (0.4, 0.4, 0.4, 0.1)
    assert (r.jitter_p, r.gray_p, r.blur_p, r.flip_p, r.scale) == (0.8, 0.2, 0.5, 0.5, (0.2, 1))
    assert A.moco_recipe("aug", 64).blur_p == 0 and A.moco_recipe("nope", 64) is None


def test_augment_batch_leaves_its_input_alone():
    recipe = A.moco_recipe("aug+", 16)
    x = (torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).byte()
    before = x.clone()
    p = _params(8, recipe)
    p["flip"][:] = True
    A.augment_batch(x, p, recipe)
    assert torch.equal(x, before)
