"""Fashion-MNIST from its idx files: a reader and an ImageFolder export.

Why: the small real-image experiment (studies/fashion_mnist.yaml) pretrains on the 60k
training images and builds its detection scenes from the 10k held-out test images. The files come
from the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/*.gz``) or
from the upstream download (same names, gzipped or not).

idx format (big-endian): two zero bytes, a dtype code (0x08 uint8, 0x09 int8, 0x0B int16,
0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions, then one uint32 per dimension,
then the data in C order.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from ..utils.errors import MCLDetError
from ..utils.io import atomic_write_text

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
APT_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"
# Folder-safe class names (no spaces or slashes), in label order 0..9.
FASHION_MNIST_CLASSES: tuple[str, ...] = tuple(
    "t-shirt trouser pullover dress coat sandal shirt sneaker bag ankle-boot".split()
)
FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one idx(.gz) file into a numpy array (native byte order)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise MCLDetError(
            f"cannot read idx file {path}: {e}; re-install or re-download it"
        ) from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise MCLDetError(f"{path} is not an idx file (bad magic); re-install or re-download it")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise MCLDetError(
            f"{path} is truncated or corrupt ({len(body)} data bytes, header says {expected}); "
            "re-install or re-download it"
        )
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an array as an idx file (gzipped when the name ends in .gz): tests and fixtures."""
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    code = codes.get(array.dtype)
    if code is None:
        raise ValueError(f"idx cannot store dtype {array.dtype}")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(_IDX_DTYPES[code]).tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(payload)


def _find(d: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (d / name).is_file():
            return d / name
    return None


def ensure_fashion_mnist(path: str | os.PathLike | None = None) -> Path:
    """Return the directory holding the four idx files, or raise a one-line error saying how to get
    them (the Debian package, or another ``path``). Never installs anything itself: installing
    system packages is the user's decision."""
    d = Path(path or DEFAULT_DIR)
    missing = [stem for pair in FILES.values() for stem in pair if _find(d, stem) is None]
    if missing:
        raise MCLDetError(
            f"Fashion-MNIST not found in {d} (missing {', '.join(missing)}[.gz]); "
            f"install it with `{APT_HINT}` or pass the directory that holds these files "
            "(--fashion-dir DIR)"
        )
    return d


def load_fashion_mnist(
    path: str | os.PathLike | None = None, split: str = "train"
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``Nx28x28`` uint8 (white item on black) and labels ``N`` int64 of one split."""
    if split not in FILES:
        raise MCLDetError(f"unknown Fashion-MNIST split {split!r}; use 'train' or 'test'")
    d = ensure_fashion_mnist(path)
    img_stem, lbl_stem = FILES[split]
    images, labels = read_idx(_find(d, img_stem)), read_idx(_find(d, lbl_stem))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise MCLDetError(
            f"Fashion-MNIST {split} files in {d} disagree: images {images.shape}, labels "
            f"{labels.shape}; re-install or re-download them"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES)):
        raise MCLDetError(f"Fashion-MNIST {split} labels in {d} are outside 0..9; re-download them")
    return images.astype(np.uint8), labels.astype(np.int64)


def select_per_class(labels: np.ndarray, limit_per_class: int | None) -> np.ndarray:
    """Indices of the first ``limit_per_class`` items of every class, in file order."""
    if limit_per_class is None:
        return np.arange(len(labels))
    if limit_per_class < 1:
        raise MCLDetError(f"limit_per_class={limit_per_class}; use a positive number or None")
    keep = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:limit_per_class]] = True
    return np.flatnonzero(keep)


def class_folder(label: int) -> str:
    """ImageFolder directory name of a class: ``"<label>_<name>"`` so that sorted order == label."""
    return f"{label}_{FASHION_MNIST_CLASSES[label]}"


def export_imagefolder(
    out_root: str | os.PathLike,
    path: str | os.PathLike | None = None,
    limit_per_class: int | None = None,
    val_limit_per_class: int | None = None,
) -> Path:
    """Write ``out_root/train/<k>_<name>/*.png`` (training set) and ``out_root/val/...`` (t10k set).

    Resumable: a finished export leaves ``out_root/.fashion_mnist_export.json``; calling again with
    the same arguments returns at once. Images stay 28x28 grayscale; pretraining transforms resize.
    """
    out = Path(out_root)
    params = {
        "source": str(ensure_fashion_mnist(path)),
        "limit_per_class": limit_per_class,
        "val_limit_per_class": val_limit_per_class,
    }
    marker = out / ".fashion_mnist_export.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return out
    marker.unlink(missing_ok=True)
    parts = (("train", "train", limit_per_class), ("val", "test", val_limit_per_class))
    for split_dir, split, limit in parts:
        images, labels = load_fashion_mnist(path, split)
        for k in range(len(FASHION_MNIST_CLASSES)):
            (out / split_dir / class_folder(k)).mkdir(parents=True, exist_ok=True)
        for i in select_per_class(labels, limit):
            dst = out / split_dir / class_folder(int(labels[i])) / f"{split}_{i:05d}.png"
            # plain writes (no fsync per image): the marker, written last, says the export is
            # complete, and an interrupted export is redone
            Image.fromarray(images[i]).save(dst, compress_level=1)
    atomic_write_text(marker, json.dumps(params) + "\n")
    return out
