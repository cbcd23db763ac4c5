"""Fashion-MNIST idx reader, ImageFolder export and the detection scenes.

The tests write a tiny synthetic Fashion-MNIST in the real idx format, so they need neither the
Debian package nor the network; one extra test reads the real package when it is installed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from mcl_det.data.fashion_mnist import (
    DEFAULT_DIR,
    FASHION_MNIST_CLASSES,
    ensure_fashion_mnist,
    export_imagefolder,
    load_fashion_mnist,
    read_idx,
    select_per_class,
    write_idx,
)
from mcl_det.data.scenes import make_fashion_scenes, mask_to_polygons, render_fashion_scene
from mcl_det.utils.errors import MCLDetError


class FashionMNIST:
    """Fashion-MNIST straight from the idx arrays as PIL images (as torchvision datasets return),
    with ImageFolder's ``targets`` and ``classes``: checks the reader and select_per_class the way
    a training loop would use them."""

    def __init__(self, root, split="train", transform=None, limit_per_class=None, rgb=True):
        images, labels = load_fashion_mnist(root, split)
        idx = select_per_class(labels, limit_per_class)
        self.images, self.labels = images[idx], labels[idx]
        self.targets = self.labels.tolist()
        self.classes = list(FASHION_MNIST_CLASSES)
        self.transform, self.rgb = transform, rgb

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        img = Image.fromarray(self.images[i])  # 2-D uint8 -> mode "L"
        if self.rgb:
            img = img.convert("RGB")
        return (img if self.transform is None else self.transform(img)), int(self.labels[i])


def register_fashion_scenes(out_root: Path, prefix: str) -> list[str]:
    """Register ``<prefix>_voc_{train,val,trainval,test}`` and ``<prefix>_coco_{train,test}``
    with detectron2 (the runs themselves pass the scenes through MCL_DET.DATASETS.VOC)."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import register_coco_instances
    from detectron2.data.datasets.pascal_voc import register_pascal_voc

    names, registered = [], set(DatasetCatalog.list())
    classes = list(FASHION_MNIST_CLASSES)
    for split in ("train", "val", "trainval", "test"):
        name = f"{prefix}_voc_{split}"
        if name not in registered:
            register_pascal_voc(name, str(out_root / "voc"), split, 2007, classes)
        names.append(name)
    for split in ("train", "test"):
        name = f"{prefix}_coco_{split}"
        if name not in registered:
            json_file = str(out_root / "coco" / "annotations" / f"instances_{split}.json")
            register_coco_instances(name, {}, json_file, str(out_root / "voc" / "JPEGImages"))
        names.append(name)
    return names


def _idx_bytes_by_hand(arr: np.ndarray) -> bytes:
    """The idx layout written out directly: 0, 0, type 0x08 (uint8), ndim, big-endian dims, data."""
    assert arr.dtype == np.uint8
    out = bytearray([0, 0, 0x08, arr.ndim])
    for d in arr.shape:
        out += struct.pack(">I", d)
    out += arr.tobytes()
    return bytes(out)


def _synthetic_items(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n 28x28 'items': a bright filled rectangle whose size depends on the class, on black."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.uint8) % 10
    images = np.zeros((n, 28, 28), np.uint8)
    for i, c in enumerate(labels):
        hw = 4 + int(c) + int(rng.integers(0, 3))
        y0, x0 = rng.integers(0, 28 - hw, size=2)
        images[i, y0 : y0 + hw, x0 : x0 + hw // 2 + 3] = rng.integers(120, 256)
    return images, labels


@pytest.fixture(scope="module")
def fm_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fashion")
    for split, n, seed in (("train", 60, 0), ("t10k", 40, 1)):
        images, labels = _synthetic_items(n, seed)
        with gzip.open(d / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(_idx_bytes_by_hand(images))
        (d / f"{split}-labels-idx1-ubyte").write_bytes(_idx_bytes_by_hand(labels))  # not gzipped
    return d


@pytest.fixture(scope="module")
def scenes(tmp_path_factory, fm_dir) -> Path:
    out = tmp_path_factory.mktemp("scenes")
    return make_fashion_scenes(out, fm_dir, num_train=8, num_test=4, seed=0)


# --------------------------------------------------------------------------- idx / ImageFolder


def test_read_idx_matches_hand_written_file(tmp_path, fm_dir):
    images, labels = load_fashion_mnist(fm_dir, "test")
    ref_images, ref_labels = _synthetic_items(40, 1)
    assert images.shape == (40, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(images, ref_images) and np.array_equal(labels, ref_labels)
    assert labels.dtype == np.int64


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_roundtrip(tmp_path, dtype, suffix):
    a = (np.arange(2 * 3 * 5) - 7).reshape(2, 3, 5).astype(dtype)
    p = tmp_path / f"a-idx3-ubyte{suffix}"
    write_idx(p, a)
    b = read_idx(p)
    assert b.dtype == np.dtype(dtype) and np.array_equal(a, b)
    if dtype == "uint8" and not suffix:  # our writer produces exactly the documented layout
        assert p.read_bytes() == _idx_bytes_by_hand(a.astype(np.uint8))


def test_idx_corrupt_and_missing(tmp_path, fm_dir):
    p = tmp_path / "x-idx3-ubyte"
    p.write_bytes((fm_dir / "t10k-labels-idx1-ubyte").read_bytes()[:-3])
    with pytest.raises(MCLDetError, match="truncated or corrupt"):
        read_idx(p)
    p.write_bytes(b"\x01\x02\x03\x04rubbish")
    with pytest.raises(MCLDetError, match="not an idx file"):
        read_idx(p)
    with pytest.raises(MCLDetError) as e:
        ensure_fashion_mnist(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)
    assert "apt-get install -y dataset-fashion-mnist" in str(e.value)
    assert ensure_fashion_mnist(fm_dir) == fm_dir


def test_dataset_returns_pil_images(fm_dir):
    from PIL import Image
    from torchvision import transforms

    ds = FashionMNIST(fm_dir, "train")
    images, labels = load_fashion_mnist(fm_dir, "train")
    assert len(ds) == 60 and ds.targets == labels.tolist()
    assert ds.classes == list(FASHION_MNIST_CLASSES)
    img, t = ds[7]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (28, 28)
    assert t == int(labels[7])
    assert np.array_equal(np.asarray(img)[..., 0], images[7])
    to_tensor = transforms.ToTensor()
    limited = FashionMNIST(fm_dir, "train", limit_per_class=2, rgb=False, transform=to_tensor)
    assert np.bincount(limited.targets).tolist() == [2] * 10
    x, _ = limited[0]
    assert tuple(x.shape) == (1, 28, 28)
    # first two of each class, in file order
    assert np.array_equal(
        limited.images[0], images[np.flatnonzero(labels == limited.targets[0])[0]]
    )


def test_export_imagefolder(tmp_path, fm_dir):
    from torchvision.datasets import ImageFolder

    out = export_imagefolder(tmp_path / "if", fm_dir, limit_per_class=3, val_limit_per_class=1)
    train, val = ImageFolder(str(out / "train")), ImageFolder(str(out / "val"))
    assert len(train.classes) == 10
    assert train.classes[0] == "0_t-shirt" and train.classes[9] == "9_ankle-boot"
    assert np.bincount(train.targets).tolist() == [3] * 10  # folder order == label
    assert np.bincount(val.targets).tolist() == [1] * 10
    images, labels = load_fashion_mnist(fm_dir, "train")
    path, target = train.samples[0]
    idx = int(Path(path).stem.split("_")[1])
    assert labels[idx] == target
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(path)), images[idx])  # png: lossless
    stamp = os.path.getmtime(out / ".fashion_mnist_export.json")
    export_imagefolder(tmp_path / "if", fm_dir, limit_per_class=3, val_limit_per_class=1)
    assert os.path.getmtime(out / ".fashion_mnist_export.json") == stamp  # resumed: nothing redone


@pytest.mark.skipif(
    not os.path.isdir(DEFAULT_DIR), reason="Debian package dataset-fashion-mnist not installed"
)
def test_real_package():
    images, labels = load_fashion_mnist(None, "train")
    assert images.shape == (60000, 28, 28) and np.bincount(labels).tolist() == [6000] * 10
    images, labels = load_fashion_mnist(None, "test")
    assert images.shape == (10000, 28, 28) and np.bincount(labels).tolist() == [1000] * 10


# --------------------------------------------------------------------------- scenes


def test_scene_boxes_tight_and_masks_are_item_pixels(fm_dir):
    images, labels = load_fashion_mnist(fm_dir, "test")
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(10):
        img, objs = render_fashion_scene(rng, images, labels)
        h, w = img.shape[:2]
        assert 160 <= h <= 256 and 160 <= w <= 256 and img.shape[2] == 3
        assert 1 <= len(objs) <= 5
        for k, o in enumerate(objs):
            ys, xs = np.nonzero(o.mask)
            assert o.box == (xs.min(), ys.min(), xs.max(), ys.max())  # tight around the mask
            # the mask holds the item's pixels: the synthetic items are flat rectangles of value
            # >= 120, so the mask's interior not covered by a later item is bright (x gain >= 0.8,
            # x tint >= 0.85) whatever the background
            later = np.zeros_like(o.mask)
            for o2 in objs[k + 1 :]:
                later |= o2.mask
            visible = o.mask & ~later
            assert visible.sum() >= 0.7 * o.mask.sum()  # overlap capped
            inner = visible.copy()  # erode by 4 px: bilinear up-scaling (x <= 4) softens the rim
            for _ in range(4):
                inner[1:] &= inner[:-1].copy()
                inner[:-1] &= inner[1:].copy()
                inner[:, 1:] &= inner[:, :-1].copy()
                inner[:, :-1] &= inner[:, 1:].copy()
            if inner.any():
                checked += 1
                assert img[inner].min() >= 0.8 * 0.85 * 120 - 1
    assert checked >= 10


def test_mask_to_polygons_covers_mask():
    from pycocotools import mask as mask_util

    m = np.zeros((40, 50), bool)
    m[5:20, 10:30] = True
    m[25:35, 35:45] = True
    polys = mask_to_polygons(m)
    assert len(polys) == 2 and all(len(p) >= 6 for p in polys)
    dec = mask_util.decode(mask_util.merge(mask_util.frPyObjects(polys, 40, 50))).astype(bool)
    # polygons run through the boundary pixel centres: they cover the mask up to its outer rim
    assert (dec & m).sum() >= 0.8 * m.sum() and not (dec & ~m).any()


def _decode(polygons: list, h: int, w: int) -> np.ndarray:
    from pycocotools import mask as mask_util

    return mask_util.decode(mask_util.merge(mask_util.frPyObjects(polygons, h, w)))


def test_scene_files_voc_and_coco(scenes):
    from detectron2.data.datasets import load_coco_json
    from detectron2.data.datasets.pascal_voc import load_voc_instances

    voc, classes = scenes / "voc", list(FASHION_MNIST_CLASSES)
    main = voc / "ImageSets" / "Main"
    ids = {s: (main / f"{s}.txt").read_text().split() for s in ("train", "val", "trainval")}
    assert ids["train"] + ids["val"] == ids["trainval"]
    tv = load_voc_instances(str(voc), "trainval", classes)
    te = load_voc_instances(str(voc), "test", classes)
    assert len(tv) == 8 and len(te) == 4
    voc_boxes = {}
    for r in tv + te:
        root = ET.parse(voc / "Annotations" / f"{r['image_id']}.xml").getroot()
        xml_names = [o.findtext("name") for o in root.findall("object")]
        assert xml_names == [classes[a["category_id"]] for a in r["annotations"]]
        voc_boxes[r["image_id"]] = [a["bbox"] for a in r["annotations"]]
        for a in r["annotations"]:
            x0, y0, x1, y1 = a["bbox"]
            assert 0 <= x0 < x1 <= r["width"] and 0 <= y0 < y1 <= r["height"]
    for split, n in (("train", 8), ("test", 4)):
        jpath = scenes / "coco" / "annotations" / f"instances_{split}.json"
        dicts = load_coco_json(str(jpath), str(voc / "JPEGImages"), f"fashion_scenes_{split}_t")
        assert len(dicts) == n and all(os.path.isfile(r["file_name"]) for r in dicts)
        data = json.loads(jpath.read_text())
        assert [c["name"] for c in data["categories"]] == classes
        size = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
        for a in data["annotations"]:  # area = item pixels; the polygon drops the outer rim
            poly_mask = _decode(a["segmentation"], *size[a["image_id"]])
            assert poly_mask.sum() <= a["area"] <= a["bbox"][2] * a["bbox"][3]
        for r in dicts:
            fid = Path(r["file_name"]).stem
            # the same objects as in VOC, with the same boxes (VOC xmin is 1-based inclusive)
            assert len(r["annotations"]) == len(voc_boxes[fid])
            for a, vb in zip(r["annotations"], voc_boxes[fid]):
                x, y, w, h = a["bbox"]
                assert [x, y, x + w, y + h] == vb
                m = _decode(a["segmentation"], r["height"], r["width"])
                ys, xs = np.nonzero(m)
                # mask inside box
                assert xs.min() >= x and xs.max() < x + w and ys.min() >= y and ys.max() < y + h
                assert xs.min() <= x + 1 and xs.max() >= x + w - 2  # and still spans it (tight)


def test_register_and_determinism(tmp_path, scenes, fm_dir):
    from detectron2.data import DatasetCatalog

    names = register_fashion_scenes(scenes, prefix="fs_test")
    assert "fs_test_voc_trainval" in names and "fs_test_coco_test" in names
    assert len(DatasetCatalog.get("fs_test_voc_test")) == 4
    assert len(DatasetCatalog.get("fs_test_coco_train")) == 8

    def digest(d: Path) -> str:
        h = hashlib.sha256()
        for p in sorted(d.rglob("*")):
            if p.is_file():
                h.update(p.name.encode() + p.read_bytes())
        return h.hexdigest()

    images, labels = load_fashion_mnist(fm_dir, "test")
    a = make_fashion_scenes(tmp_path / "a", (images, labels), num_train=4, num_test=2, seed=3)
    b = make_fashion_scenes(tmp_path / "b", (images, labels), num_train=4, num_test=2, seed=3)
    c = make_fashion_scenes(tmp_path / "c", (images, labels), num_train=4, num_test=2, seed=4)
    assert digest(a) == digest(b) != digest(c)
    with pytest.raises(MCLDetError, match="at least"):
        make_fashion_scenes(tmp_path / "d", (images, labels), num_train=1, num_test=1)


def test_cli_fashion(tmp_path, fm_dir):
    import subprocess
    import sys

    tool = str(Path(__file__).resolve().parents[2] / "tools" / "make_toy_data.py")
    base = [sys.executable, tool, "--root", str(tmp_path), "--fashion-dir", str(fm_dir)]
    sizes = ["--num-train", "4", "--num-test", "2"]
    r = subprocess.run([*base, "--what", "fashion-scenes", *sizes], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "scenes" / "scenes.json").read_text())
    assert summary["counts"]["test"]["images"] == 2
    missing = [sys.executable, tool, "--root", str(tmp_path), "--what", "fashion-scenes"]
    missing += ["--fashion-dir", str(tmp_path / "none")]
    r = subprocess.run(missing, capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: Fashion-MNIST not found")
    assert "Traceback" not in r.stderr
