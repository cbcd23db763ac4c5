"""Data for MCL pretraining: ImageFolder that survives bad files, MoCo v2 "aug+", samplers.

Reproducibility by construction: the sampler yields ``(index, epoch)`` pairs and the dataset seeds
the augmentation of each sample from ``(SEED, epoch, index)`` inside ``torch.random.fork_rng``.
An image therefore gets the same crops whatever the number of workers or ranks, and a run resumed
in the middle of an epoch sees exactly the batches it would have seen without the interruption.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..data.toy import make_toy_imagenet
from ..utils.errors import MCLDetError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision / ImageNet RGB
TOY_ROOT = "datasets/toy/imagenet"


# ---------------------------------------------------------------------------- transforms


def moco_v2_transform(size: int = 224, aug: str = "aug+") -> T.Compose:
    """MoCo v2 "aug+" (or v1 "aug"). Every random draw uses the torch RNG (seeded per sample)."""
    normalize = T.Normalize(MEAN, STD)
    if aug == "aug":
        ops = [
            T.RandomResizedCrop(size, scale=(0.2, 1.0)),
            T.RandomGrayscale(p=0.2),
            T.ColorJitter(0.4, 0.4, 0.4, 0.4),
            T.RandomHorizontalFlip(),
        ]
    elif aug == "aug+":
        k = max(3, int(0.1 * size) // 2 * 2 + 1)  # odd kernel ~10% of the crop (23 at 224)
        ops = [
            T.RandomResizedCrop(size, scale=(0.2, 1.0)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5),
            T.RandomHorizontalFlip(),
        ]
    else:
        raise MCLDetError(f"unknown DATA.AUG {aug!r}; use aug+ (MoCo v2) or aug (MoCo v1)")
    return T.Compose([*ops, T.ToTensor(), normalize])


class TwoCrops:
    """Two independent draws of the same transform: query and key views."""

    def __init__(self, t: T.Compose) -> None:
        self.t = t

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [self.t(img), self.t(img)]


def supervised_transform(size: int = 224) -> T.Compose:
    """ImageNet training recipe: RandomResizedCrop + flip."""
    return T.Compose(
        [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)]
    )


def eval_transform(size: int = 224) -> T.Compose:
    """Resize to size/0.875 then centre crop (224 <- 256)."""
    return T.Compose(
        [
            T.Resize(int(round(size / 0.875))),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )


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

    def __init__(self, root: str | os.PathLike, transform=None, seed: int = 0, scan: bool = True):
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

    def _load(self, i: int) -> tuple[Image.Image, int, int]:
        for k in range(len(self.samples)):
            j = (i + k) % len(self.samples)
            path, label = self.samples[j]
            try:
                with Image.open(path) as im:
                    return im.convert("RGB"), label, j
            except Exception:
                self.load_failures += 1
                print(f"warning: skipping unreadable image {path}", flush=True)
        raise MCLDetError(f"no readable image left in {self.root}; check the dataset files")

    def __getitem__(self, key):
        i, epoch = key if isinstance(key, tuple) else (key, -1)
        img, label, _ = self._load(int(i))
        if self.transform is None:
            return img, label, int(i)
        with torch.random.fork_rng(devices=[]):
            # the crops of image i at epoch e are a pure function of (SEED, e, i)
            torch.manual_seed((self.seed * 1_000_003 + (epoch + 1) * 7_919_111 + int(i)) % 2**62)
            out = self.transform(img)
        return out, label, int(i)


def resolve_data_root(cfg) -> Path:
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
