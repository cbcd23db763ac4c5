"""Data for MCL pretraining: ImageFolder that survives bad files, MoCo v2 "aug+", samplers.

Reproducibility by construction: the sampler yields ``(index, epoch)`` pairs and the dataset seeds
the augmentation of each sample from ``(SEED, epoch, index)`` inside ``torch.random.fork_rng``.
An image therefore gets the same crops whatever the number of workers or ranks, and a run resumed
in the middle of an epoch sees exactly the batches it would have seen without the interruption.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler, default_collate
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import functional as TF
from torchvision.transforms.v2 import functional as TF2
from yacs.config import CfgNode

from ..data.toy import make_toy_imagenet
from ..utils.errors import MCLDetError
from .augment import (
    MEAN,
    STD,
    AugRecipe,
    augment_batch,
    decode_and_crop,
    draw_view_params,
    moco_recipe,
    normalize_uint8,
)

TOY_ROOT = "datasets/toy/imagenet"


# ---------------------------------------------------------------------------- transforms


def moco_v2_transform(size: int = 224, aug: str = "aug+") -> T.Compose:
    """MoCo v2 "aug+" (or v1 "aug") on PIL images, all on the CPU (``DATA.PIPELINE pil``).

    Every random draw uses the torch RNG (seeded per sample); the numbers come from the same
    :class:`~mcl_det.pretrain.augment.AugRecipe` as the device pipeline's.
    """
    r = _recipe(aug, size)
    ops: list = [T.RandomResizedCrop(size, scale=r.scale, ratio=r.ratio)]
    gray = T.RandomGrayscale(p=r.gray_p)
    if r.gray_first:
        ops.append(gray)
    jitter = r.color_jitter()
    ops.append(jitter if r.jitter_p >= 1.0 else T.RandomApply([jitter], p=r.jitter_p))
    if not r.gray_first:
        ops.append(gray)
    if r.blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(r.blur_kernel, sigma=r.sigma)], p=r.blur_p))
    ops.append(T.RandomHorizontalFlip(p=r.flip_p))
    return T.Compose([*ops, T.ToTensor(), T.Normalize(MEAN, STD)])


def _recipe(aug: str, size: int) -> AugRecipe:
    recipe = moco_recipe(aug, size)
    assert recipe is not None, f"DATA.AUG {aug!r} passed config.check_cfg"
    return recipe


class TwoCrops:
    """Two independent draws of the same transform: query and key views."""

    def __init__(self, t: T.Compose) -> None:
        self.t = t

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [self.t(img), self.t(img)]


def supervised_transform(size: int = 224, scale: Sequence[float] = (0.08, 1.0)) -> T.Compose:
    """ImageNet training recipe: RandomResizedCrop (area fraction in ``scale``) + flip."""
    crop = T.RandomResizedCrop(size, scale=tuple(scale))
    return T.Compose([crop, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])


def eval_transform(size: int = 224, crop: float = 0.875) -> T.Compose:
    """Resize to size/crop then centre crop ``size`` (ImageNet's 224 <- 256 at 0.875)."""
    return T.Compose(
        [
            T.Resize(int(round(size / crop))),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )


# ---------------------------------------------------------------------------- device pipeline
# DATA.PIPELINE device: the workers only decode and crop (uint8); augment.augment_batch does the
# rest on the training device. Every class below draws with the torch RNG the dataset seeded.


def read_uint8(path: str) -> torch.Tensor:
    """A file as a 3xHxW uint8 RGB tensor: torchvision's decoders (libjpeg-turbo straight to a
    tensor, faster than PIL + conversion), PIL for the formats they do not read."""
    try:
        return decode_image(read_file(path), mode=ImageReadMode.RGB)
    except RuntimeError:
        with Image.open(path) as im:
            return TF.pil_to_tensor(im.convert("RGB"))


class CropViews:
    """CPU stage, self-supervised: per view a uint8 3xSxS crop and its device-stage parameters.

    Decodes to a tensor and crops with torchvision's uint8 antialiased bilinear resize (about 3x
    faster than PIL's resize, within a few grey levels of it).
    """

    read = staticmethod(read_uint8)  # SafeImageFolder reads files with this

    def __init__(self, recipe: AugRecipe, views: int = 2) -> None:
        self.recipe, self.views = recipe, views

    def __call__(self, img: torch.Tensor) -> list[tuple[torch.Tensor, dict]]:
        out = []
        s, hw = self.recipe.size, tuple(img.shape[-2:])
        for _ in range(self.views):
            (i, j, h, w), params = draw_view_params(hw, self.recipe)
            crop = TF2.resized_crop(img, i, j, h, w, [s, s], antialias=True)
            out.append((crop, params))
        return out


class EncodedViews:
    """CPU stage for JPEG decoding on the GPU: the file's bytes, crop boxes and parameters.

    Reads only the image header (for the crop boxes); files that are not JPEG are decoded here.
    Items are collated by :func:`collate_encoded`; the device stage is ``decode_and_crop``.
    """

    def __init__(self, recipe: AugRecipe, views: int = 2) -> None:
        self.recipe, self.views = recipe, views

    @staticmethod
    def read(path: str) -> tuple[torch.Tensor, tuple[int, int]]:
        with Image.open(path) as im:
            hw = (im.height, im.width)
            if im.format == "JPEG":
                return read_file(path), hw
            return TF.pil_to_tensor(im.convert("RGB")), hw

    def __call__(self, item: tuple[torch.Tensor, tuple[int, int]]) -> dict:
        data, hw = item
        boxes, params = zip(*(draw_view_params(hw, self.recipe) for _ in range(self.views)))
        return {"data": data, "crops": torch.tensor(boxes), "params": list(params)}


def collate_encoded(batch: list) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Batch of :class:`EncodedViews` items: the files stay a list (their sizes differ)."""
    samples, labels, idx = zip(*batch)
    views = len(samples[0]["params"])
    params = [default_collate([s["params"][v] for s in samples]) for v in range(views)]
    enc = {
        "data": [s["data"] for s in samples],
        "crops": torch.stack([s["crops"] for s in samples]),  # BxVx4
        "params": params,
    }
    return enc, torch.tensor(labels), torch.tensor(idx)


def uint8_supervised_transform(size: int = 224, scale: Sequence[float] = (0.08, 1.0)) -> T.Compose:
    """CPU stage of supervised training and linear evaluation (crop and flip are cheap here)."""
    crop = T.RandomResizedCrop(size, scale=tuple(scale))
    return T.Compose([crop, T.RandomHorizontalFlip(), T.PILToTensor()])


def resolve_pipeline(cfg: CfgNode, device: torch.device, mode: str | None = None) -> str:
    """DATA.PIPELINE -> "pil" or "device" (the values are checked by ``config.check_cfg``; what
    depends on the device is checked here, before anything starts).

    ``auto`` is ``device`` when training on CUDA (the point of it: the workers stop being the
    bottleneck) and ``pil`` on the CPU, where the PIL chain runs in the worker processes in parallel
    with the step while the batched stage would run in the training process, serially with it.
    """
    kind, decoder = cfg.DATA.PIPELINE, cfg.DATA.JPEG_DECODE
    if kind == "auto":
        kind = "device" if device.type == "cuda" else "pil"
    if decoder == "cuda" and (kind != "device" or device.type != "cuda"):
        raise MCLDetError(
            "DATA.JPEG_DECODE cuda needs DATA.PIPELINE device (or auto) and training on CUDA; "
            "set DATA.JPEG_DECODE cpu"
        )
    if decoder == "cuda" and (mode or cfg.MODE) != "selfsup":
        raise MCLDetError("DATA.JPEG_DECODE cuda is implemented for MODE selfsup only; use cpu")
    return kind


class InputPipeline:
    """Both stages of the training input for one run: what the workers do, and what the
    training step does on the device (:meth:`views` for the two self-supervised views,
    :meth:`images` for supervised batches)."""

    def __init__(self, cfg: CfgNode, device: torch.device, mode: str | None = None) -> None:
        mode = mode or cfg.MODE  # linear evaluation uses the supervised input of any run
        self.kind = resolve_pipeline(cfg, device, mode)
        self.mode = mode
        self.device, self.size = device, int(cfg.DATA.IMAGE_SIZE)
        self.collate_fn = None
        self.recipe = _recipe(cfg.DATA.AUG, self.size) if mode == "selfsup" else None
        if mode == "selfsup" and self.kind == "pil":
            self.train_transform = TwoCrops(moco_v2_transform(self.size, cfg.DATA.AUG))
        elif mode == "selfsup" and cfg.DATA.JPEG_DECODE == "cuda":
            self.train_transform = EncodedViews(self.recipe)
            self.collate_fn = collate_encoded
        elif mode == "selfsup":
            self.train_transform = CropViews(self.recipe)
        elif self.kind == "pil":
            self.train_transform = supervised_transform(self.size, cfg.DATA.SUP_CROP_SCALE)
        else:
            self.train_transform = uint8_supervised_transform(self.size, cfg.DATA.SUP_CROP_SCALE)

    def views(self, batch_views: Sequence | dict) -> list[torch.Tensor]:
        """The device stage of the self-supervised views: normalised float batches on the device."""
        if self.kind == "pil":
            return [v.to(self.device, non_blocking=True) for v in batch_views]
        if isinstance(batch_views, dict):  # JPEG bytes, decoded on the GPU
            crops = decode_and_crop(
                batch_views["data"], batch_views["crops"], self.size, self.device
            )
            pairs = zip(crops, batch_views["params"])
        else:
            pairs = batch_views
        return [augment_batch(x, p, self.recipe, self.device) for x, p in pairs]

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """The device stage of a supervised batch (uint8 -> normalised float on the device)."""
        if self.kind == "pil":
            return x.to(self.device, non_blocking=True)
        return normalize_uint8(x, self.device)

    def device_stage(self, batch: tuple) -> tuple:
        """A loader batch ``(images, labels, indices)`` with its images through the device stage:
        ``(x_q, x_k)`` for the self-supervised views, one float batch for supervised ones."""
        x, y, idx = batch
        x = tuple(self.views(x)) if self.mode == "selfsup" else self.images(x)
        return x, y, idx


# ---------------------------------------------------------------------------- dataset


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


class SafeImageFolder(Dataset):
    """ImageFolder (``root/<class>/<image>``) where unreadable images are skipped and counted.

    ``scan=True`` opens every image header at construction (cheap: no decode) and drops the ones
    PIL cannot identify; ``num_skipped`` and ``skipped`` report them. A file that still fails to
    decode later is replaced by the next readable sample and counted in ``load_failures`` (per
    process: worker counts are not sent back, they are printed as warnings).
    Items: ``(image or [crops], label, index)``; the index may be an int or ``(index, epoch)``.
    Samples stay sorted by class (contiguous class blocks), which the bank sampler relies on.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        seed: int = 0,
        scan: bool = True,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise MCLDetError(
                f"dataset folder not found: {root}; set DATA.ROOT to an ImageFolder root "
                "(with train/<class>/*.JPEG and val/<class>/*.JPEG) or to 'toy'"
            )
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.root, self.transform, self.seed = root, transform, seed
        samples: list[tuple[str, int]] = []
        for label, c in enumerate(self.classes):
            for dirpath, _, files in sorted(os.walk(root / c, followlinks=True)):
                samples += [
                    (os.path.join(dirpath, f), label) for f in sorted(files) if _is_image(f)
                ]
        if not samples:
            raise MCLDetError(
                f"no images found in {root} (expected {root}/<class>/<image>.JPEG); "
                "check DATA.ROOT / DATA.TRAIN_DIR / DATA.VAL_DIR"
            )
        self.skipped: list[str] = []
        if scan:
            good = []
            for path, label in samples:
                try:
                    with Image.open(path) as im:
                        im.size  # noqa: B018 - header parse only
                    good.append((path, label))
                except Exception:
                    self.skipped.append(path)
            samples = good
        if not samples:
            raise MCLDetError(f"every image in {root} is unreadable; check the dataset files")
        self.samples = samples
        self.targets = [s[1] for s in samples]
        self.load_failures = 0

    @property
    def num_skipped(self) -> int:
        return len(self.skipped) + self.load_failures

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, i: int, read=None) -> tuple:
        """Item i read by ``read(path)`` (default: a PIL RGB image), or the next readable one."""
        for k in range(len(self.samples)):
            j = (i + k) % len(self.samples)
            path, label = self.samples[j]
            try:
                if read is not None:
                    return read(path), label, j
                with Image.open(path) as im:
                    return im.convert("RGB"), label, j
            except Exception:
                self.load_failures += 1
                print(f"warning: skipping unreadable image {path}", flush=True)
        raise MCLDetError(f"no readable image left in {self.root}; check the dataset files")

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, -1)
        img, label, _ = self._load(int(i), getattr(self.transform, "read", None))
        if self.transform is None:
            return img, label, int(i)
        with torch.random.fork_rng(devices=[]):
            # the crops of image i at epoch e are a pure function of (SEED, e, i); only the CPU
            # generator is seeded (torch.manual_seed would also queue CUDA seeding, per item)
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, int(i)))
            out = self.transform(img)
        return out, label, int(i)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The RNG seed of every random draw made for dataset item ``index`` at ``epoch``."""
    return (seed * 1_000_003 + (epoch + 1) * 7_919_111 + index) % 2**62


def resolve_data_root(cfg: CfgNode) -> Path:
    """DATA.ROOT, or the generated toy ImageFolder when it is "" / "toy"."""
    root = str(cfg.DATA.ROOT)
    if root in ("", "toy"):
        path = Path(TOY_ROOT)
        if not (path / cfg.DATA.TRAIN_DIR).is_dir():
            make_toy_imagenet(path)
        return path
    return Path(root)


# ---------------------------------------------------------------------------- samplers


class EpochBatchSampler(Sampler):
    """Local batches of ``(index, epoch)`` for one rank, reproducible from (seed, epoch).

    Global batch g (size G) is the same whatever the world size; rank r gets its slice
    [r*G/W, (r+1)*G/W). ``balanced=True`` makes every global batch P classes x
    ``samples_per_class`` images (class-balanced sampler: each anchor has in-batch positives).
    ``set_epoch(e, start_batch)`` skips the first batches (mid-epoch resume). Last partial
    batch dropped.
    """

    def __init__(
        self,
        targets: Sequence[int],
        global_batch: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        balanced: bool = False,
        samples_per_class: int = 4,
    ) -> None:
        if global_batch % world:
            raise MCLDetError(
                f"SOLVER.IMS_PER_BATCH {global_batch} is not divisible by the {world} processes"
            )
        self.n = len(targets)
        if self.n < global_batch:
            raise MCLDetError(
                f"the dataset has {self.n} images, fewer than one batch of {global_batch}; "
                "lower SOLVER.IMS_PER_BATCH or use more data"
            )
        self.targets = torch.as_tensor(list(targets))
        self.G, self.rank, self.world, self.seed = global_batch, rank, world, seed
        self.balanced, self.spc = balanced, samples_per_class
        if balanced:
            ncls = int(self.targets.max()) + 1
            if global_batch % samples_per_class or global_batch // samples_per_class > ncls:
                raise MCLDetError(
                    f"class-balanced batches need SOLVER.IMS_PER_BATCH ({global_batch}) = P x "
                    f"SUP.SAMPLES_PER_CLASS ({samples_per_class}) with P <= {ncls} classes"
                )
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def batches_per_epoch(self) -> int:
        return self.n // self.G

    def _global_batches(self) -> torch.Tensor:  # nb x G dataset indices
        g = torch.Generator().manual_seed(self.seed * 10007 + self.epoch)
        nb = self.batches_per_epoch()
        if not self.balanced:
            return torch.randperm(self.n, generator=g)[: nb * self.G].view(nb, self.G)
        ncls = int(self.targets.max()) + 1
        pools = [torch.nonzero(self.targets == c).flatten() for c in range(ncls)]
        pools = [p[torch.randperm(len(p), generator=g)] for p in pools]
        ptr = [0] * ncls
        p_cls = self.G // self.spc
        out = torch.empty(nb, self.G, dtype=torch.long)
        present = [c for c in range(ncls) if len(pools[c])]
        for b in range(nb):
            order = torch.randperm(len(present), generator=g)[:p_cls]
            row = []
            for c in (present[int(i)] for i in order):
                pool = pools[c]
                if ptr[c] + self.spc > len(pool):  # reshuffle BEFORE the draw: no repeats in it
                    pools[c], ptr[c] = pool[torch.randperm(len(pool), generator=g)], 0
                    pool = pools[c]
                # a class smaller than samples_per_class repeats images (cycled), unavoidably
                take = [int(pool[(ptr[c] + k) % len(pool)]) for k in range(self.spc)]
                ptr[c] += self.spc
                row += take
            out[b] = torch.tensor(row)
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        local = self.G // self.world
        for row in self._global_batches()[self.start :]:
            mine = row[self.rank * local : (self.rank + 1) * local]
            yield [(int(i), self.epoch) for i in mine]

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch() - self.start)
