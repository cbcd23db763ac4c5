"""Batched MoCo v2 "aug+" with per-sample parameters, run on the training device.

The input pipeline is cut in two stages:

* CPU stage (DataLoader workers, :mod:`mcl_det.pretrain.data`): decode, RandomResizedCrop and
  resize to the crop size, as uint8. It also draws every other random parameter of the view
  (:func:`draw_view_params`) from the same per-sample seeded RNG, in the same order as the
  torchvision chain of the ``pil`` pipeline, so both pipelines take the same random decisions for
  the same (SEED, epoch, index).
* device stage (training process, :func:`augment_batch`): colour jitter in a per-sample random
  order, grayscale, Gaussian blur with a per-sample sigma, flip, normalisation, batched.

The batched operations follow torchvision's tensor semantics (``transforms.v2.functional`` on float
images in [0, 1]); tests compare each one with torchvision on single images. Parameters are plain
tensors drawn on the CPU, never on the device: the device RNG plays no part, so results do not
depend on the number of workers, ranks or on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision / ImageNet RGB

# colour-jitter operation ids, as in torchvision's ColorJitter (its random order is a permutation)
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
# keys of one view's parameter dict (each value a tensor; batched by the DataLoader's collate)
PARAM_KEYS = ("jitter", "order", "factors", "gray", "blur", "sigma", "flip")


def blur_kernel_size(size: int) -> int:
    """MoCo v2's odd Gaussian kernel of about 10% of the crop (23 at 224)."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


@dataclass(frozen=True)
class AugRecipe:
    """The random augmentation of one view; one definition for the PIL and device pipelines."""

    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness..hue strength
    jitter_p: float = 0.8
    gray_p: float = 0.2
    gray_first: bool = False  # MoCo v1 "aug" draws grayscale before the jitter
    blur_p: float = 0.5
    sigma: tuple[float, float] = (0.1, 2.0)
    flip_p: float = 0.5

    @property
    def blur_kernel(self) -> int:
        return blur_kernel_size(self.size)

    def color_jitter(self) -> T.ColorJitter:
        return T.ColorJitter(*self.jitter)

    @cached_property
    def jitter_ranges(self) -> tuple:
        """(min, max) of brightness, contrast, saturation, hue factors, as torchvision sets them."""
        cj = self.color_jitter()
        return cj.brightness, cj.contrast, cj.saturation, cj.hue


AUGS = ("aug+", "aug")  # the names DATA.AUG takes: MoCo v2, MoCo v1 (config.check_cfg checks them)


def moco_recipe(aug: str, size: int) -> AugRecipe | None:
    """MoCo v2 "aug+" or MoCo v1 "aug"; None for a name outside ``AUGS``."""
    if aug == "aug+":
        return AugRecipe(size)
    if aug == "aug":
        return AugRecipe(size, jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, gray_first=True, blur_p=0)
    return None


def draw_view_params(
    image_hw: tuple[int, int], recipe: AugRecipe
) -> tuple[tuple[int, int, int, int], dict]:
    """Crop box (top, left, height, width) and the device-stage parameters of one view of an
    image of ``image_hw`` (height, width).

    Uses the global torch RNG (the dataset seeds it per sample) and draws exactly what the
    torchvision chain of :func:`mcl_det.pretrain.data.moco_v2_transform` draws, in its order, by
    calling the same ``get_params``: the two pipelines share their random decisions.
    """
    shape_only = torch.empty(()).expand(1, *image_hw)  # get_params reads the size, nothing else
    crop = T.RandomResizedCrop.get_params(shape_only, list(recipe.scale), list(recipe.ratio))
    order, factors = torch.arange(4), torch.tensor([1.0, 1.0, 1.0, 0.0])
    jitter = gray = blur = False
    sigma = 0.0

    def draw_jitter() -> None:
        nonlocal order, factors
        idx, b, c, s, h = T.ColorJitter.get_params(*recipe.jitter_ranges)
        order, factors = idx, torch.tensor([b, c, s, h])

    if recipe.gray_first:
        gray = bool(torch.rand(1) < recipe.gray_p)  # T.RandomGrayscale
    if recipe.jitter_p >= 1.0:  # a bare T.ColorJitter: no coin
        jitter = True
        draw_jitter()
    elif recipe.jitter_p > 0:
        jitter = not bool(recipe.jitter_p < torch.rand(1))  # T.RandomApply
        if jitter:
            draw_jitter()
    if not recipe.gray_first:
        gray = bool(torch.rand(1) < recipe.gray_p)
    if recipe.blur_p > 0:
        blur = not bool(recipe.blur_p < torch.rand(1))
        if blur:
            sigma = T.GaussianBlur.get_params(*recipe.sigma)
    flip = bool(torch.rand(1) < recipe.flip_p)  # T.RandomHorizontalFlip
    params = {
        "jitter": torch.tensor(jitter),
        "order": order.long(),
        "factors": factors.float(),
        "gray": torch.tensor(gray),
        "blur": torch.tensor(blur),
        "sigma": torch.tensor(sigma, dtype=torch.float32),
        "flip": torch.tensor(flip),
    }
    return crop, params


# ---------------------------------------------------------------------------- batched operations
# x: Nx3xHxW float in [0, 1]; f: N per-sample factors. Same formulas as torchvision's tensor
# kernels (transforms.v2.functional), with the scalar factor replaced by a per-sample one.


def _per_sample(f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return f.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)  # Nx1x1x1


def _blend(a: torch.Tensor, b: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    r = _per_sample(f, a)
    return (a * r + b * (1.0 - r)).clamp_(0.0, 1.0)


def to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Nx3xHxW -> Nx1xHxW luma (ITU-R 601-2, torchvision's weights)."""
    r, g, b = x.unbind(dim=-3)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).unsqueeze(-3)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * _per_sample(f, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)  # Nx1x1x1
    return _blend(x, mean, f)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return _blend(x, to_grayscale(x), f)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    minc, maxc = torch.aminmax(x, dim=-3)
    same = maxc == minc  # gray pixel: hue and saturation are 0 (no division by zero)
    span = maxc - minc
    s = span / torch.where(same, torch.ones_like(maxc), maxc)
    span = torch.where(same, torch.ones_like(span), span)
    rc, gc, bc = (maxc - r) / span, (maxc - g) / span, (maxc - b) / span
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~is_r & ~is_g
    h = (bc - gc) * is_r + (2.0 + rc - bc) * is_g + (4.0 + gc - rc) * is_b
    h = (h / 6.0 + 1.0).fmod(1.0)
    return torch.stack((h, s, maxc), dim=-3)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(dim=-3)
    h6 = h * 6.0
    sector = torch.floor(h6)
    frac = h6 - sector
    sector = sector.to(torch.int64).remainder(6)
    p = ((1.0 - s) * v).clamp(0.0, 1.0)
    q = ((1.0 - s * frac) * v).clamp(0.0, 1.0)
    t = ((1.0 - s + s * frac) * v).clamp(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=-3)  # Nx4xHxW
    # (r, g, b) as indices into (v, p, q, t) for each of the six hue sectors
    table = torch.tensor(
        [[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], device=x.device
    )
    pick = table[:, sector].movedim(0, -3)  # Nx3xHxW
    return vpqt.gather(-3, pick)


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    hsv = _rgb_to_hsv(x)
    h = (hsv[:, 0:1] + _per_sample(f, x)).remainder(1.0)
    return _hsv_to_rgb(torch.cat((h, hsv[:, 1:]), dim=1))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Per-sample sigma, reflect padding, as torchvision's gaussian_blur with a square kernel.

    Separable (two 1-D passes: 2k multiply-adds per pixel instead of k^2), every sample and
    channel its own group of one depthwise convolution.
    """
    n, c, h, w = x.shape
    half = (kernel_size - 1) / 2.0
    t = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    s = sigma.to(device=x.device, dtype=x.dtype).view(-1, 1)
    k1 = torch.softmax(-0.5 * (t / s) ** 2, dim=1)  # Nxk, normalised Gaussian
    k1 = k1.repeat_interleave(c, dim=0)  # (N*C)xk
    pad = kernel_size // 2
    y = x.reshape(1, n * c, h, w)
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), k1.view(n * c, 1, 1, -1), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), k1.view(n * c, 1, -1, 1), groups=n * c)
    return y.view(n, c, h, w)


def normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def to_unit_float(x_u8: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1]."""
    return TF.to_dtype(x_u8, torch.float32, scale=True)


def normalize_uint8(x_u8: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Device stage of the supervised / linear-evaluation / evaluation pipelines."""
    x = x_u8.to(device, non_blocking=True) if device is not None else x_u8
    return normalize(to_unit_float(x))


_JITTER_OPS = {
    BRIGHTNESS: adjust_brightness,
    CONTRAST: adjust_contrast,
    SATURATION: adjust_saturation,
    HUE: adjust_hue,
}


def _apply_to(x: torch.Tensor, mask: torch.Tensor, fn, *args: torch.Tensor) -> torch.Tensor:
    """x[mask] = fn(x[mask], args[mask]); the mask lives on the CPU, so no device sync."""
    idx = torch.nonzero(mask).flatten()
    if idx.numel() == 0:
        return x
    sel = idx.to(x.device, non_blocking=True)
    x[sel] = fn(x[sel], *(a[idx] for a in args))
    return x


@torch.no_grad()
def augment_batch(
    x_u8: torch.Tensor,
    params: dict[str, torch.Tensor],
    recipe: AugRecipe,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Device stage of one view: Bx3xHxW uint8 + per-sample params -> normalised float32.

    ``params`` are the batched dicts of :func:`draw_view_params`, kept on the CPU (they decide
    which samples each operation touches); the images move to ``device`` (default: where they are).
    """
    x = x_u8.to(device, non_blocking=True) if device is not None else x_u8
    p = {k: v.cpu() for k, v in params.items()}
    x = to_unit_float(x)  # a new tensor: the caller's batch is left as it was
    x = _apply_to(x, p["flip"], lambda v: v.flip(-1))  # commutes with every later step
    gray = p["gray"]
    if recipe.gray_first:
        x = _apply_to(x, gray, lambda v: to_grayscale(v).expand_as(v))
    jitter, order, factors = p["jitter"], p["order"], p["factors"]
    for step in range(4):  # the k-th operation of each sample's own random order
        for op, fn in _JITTER_OPS.items():
            x = _apply_to(x, jitter & (order[:, step] == op), fn, factors[:, op])
    if not recipe.gray_first:
        x = _apply_to(x, gray, lambda v: to_grayscale(v).expand_as(v))
    x = _apply_to(x, p["blur"], lambda v, s: gaussian_blur(v, s, recipe.blur_kernel), p["sigma"])
    return normalize(x)


# ---------------------------------------------------------------------------- JPEG on the GPU


def decode_and_crop(
    data: list[torch.Tensor], crops: torch.Tensor, size: int, device: torch.device
) -> list[torch.Tensor]:
    """Decode a batch of JPEG files on a CUDA device and cut each view's crop.

    ``data[i]`` is a file's bytes (1-D uint8) or an image the worker already decoded (3xHxW uint8,
    for files that are not JPEG); ``crops`` is BxVx4 (top, left, height, width). Returns V uint8
    batches Bx3xSxS. Bilinear with antialiasing, as PIL's resize in the CPU stage (not bit-equal).
    Needs CUDA: it is not exercised by the CPU test suite.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    enc = [i for i, d in enumerate(data) if d.dim() == 1]
    images: list[torch.Tensor | None] = [None] * len(data)
    if enc:
        decoded = decode_jpeg([data[i] for i in enc], mode=ImageReadMode.RGB, device=device)
        for i, img in zip(enc, decoded):
            images[i] = img
    for i, d in enumerate(data):
        if d.dim() == 3:
            images[i] = d.to(device, non_blocking=True)
    views = []
    for v in range(crops.shape[1]):
        views.append(
            torch.stack(
                [
                    TF.resized_crop(img, *crops[i, v].tolist(), [size, size], antialias=True)
                    for i, img in enumerate(images)
                ]
            )
        )
    return views
