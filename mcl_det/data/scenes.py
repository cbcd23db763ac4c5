"""Detection scenes built from Fashion-MNIST items, written as a VOC devkit and as COCO json.

Why: the Fashion-MNIST experiment asks whether MCL pretraining on Fashion-MNIST transfers to
*detection*. There is no detection set of clothes at that scale, so we compose one: several
held-out (t10k) items pasted at random scales and positions on a larger noisy canvas, with
unlabelled fragments of other items as clutter. The label is the item's class, the mask the item's
pixels (value above a threshold after scaling), the box the tight extent of that mask.

Layout of ``out_root`` (one set of JPEGs, two annotation formats):

    voc/JPEGImages/*.jpg, voc/Annotations/*.xml, voc/ImageSets/Main/{train,val,trainval,test}.txt
    coco/annotations/instances_{train,test}.json   (image_root = voc/JPEGImages)

Train scenes use the first half of the t10k items and test scenes the second half, so no item of
a test scene was seen in detection training (nor in pretraining, which uses the 60k train set).

Limits, honestly: masks and boxes are amodal (an item partly covered by a later one keeps its full
mask); overlap is capped (at most 25% of either item's pixels) so every item stays mostly visible.
COCO polygons trace the outer contour, so holes (a bag's handle) are filled in the polygon masks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..utils.errors import MCLDetError
from ..utils.io import atomic_write_text
from .fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from .formats import (
    SceneObject,
    coco_bbox,
    mask_box,
    prepare_output_dir,
    write_coco_json,
    write_jpeg,
    write_voc_annotation,
    write_voc_splits,
)

SCENES_FORMAT = "mcl_det.fashion_scenes/v1"


def mask_to_polygons(mask: np.ndarray, min_points: int = 3) -> list[list[float]]:
    """COCO polygons (flat [x1, y1, ...]) of the outer contours of a HxW bool mask (cv2)."""
    import cv2

    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    polys = []
    for c in contours:
        c = c.reshape(-1, 2)
        if len(c) < min_points:  # a 1-2 pixel speck: no area as a polygon
            continue
        polys.append([float(v) for v in c.reshape(-1)])
    return polys


def _scale_item(item: np.ndarray, scale: float, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize a 28x28 item; returns (pixels hxw uint8, mask hxw bool = pixels > threshold)."""
    side = max(8, int(round(28 * scale)))
    pix = np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR))
    return pix, pix > threshold


def render_fashion_scene(
    rng: np.random.Generator,
    images: np.ndarray,
    labels: np.ndarray,
    canvas_range: tuple[int, int] = (160, 256),
    items_range: tuple[int, int] = (2, 5),
    scale_range: tuple[float, float] = (1.5, 4.0),
    threshold: int = 20,
) -> tuple[np.ndarray, list[SceneObject]]:
    """One scene: HxWx3 uint8 image and its objects (label, amodal mask, tight box).

    ``images``/``labels`` are the item pool (Nx28x28 uint8, N). Items are grayscale; the canvas is
    RGB with a faint colour cast so that pretrained RGB stems see ordinary 3-channel input.
    """
    w, h = (int(v) for v in rng.integers(canvas_range[0], canvas_range[1] + 1, size=2))
    # background: dark noisy field with a slow gradient
    base = rng.uniform(10, 70)
    grad = rng.uniform(-25, 25, size=2)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gray = base + grad[0] * yy / h + grad[1] * xx / w + rng.normal(0, 10, size=(h, w))
    # clutter: unlabelled fragments (small crops of random items) at reduced contrast
    for _ in range(int(rng.integers(2, 7))):
        it = images[int(rng.integers(len(images)))]
        cs = int(rng.integers(7, 13))
        y0, x0 = (int(v) for v in rng.integers(0, 28 - cs + 1, size=2))
        frag = np.asarray(Image.fromarray(it[y0 : y0 + cs, x0 : x0 + cs]).resize((cs * 2, cs * 2)))
        fh, fw = frag.shape
        if fw >= w or fh >= h:
            continue
        px, py = int(rng.integers(0, w - fw)), int(rng.integers(0, h - fh))
        region = gray[py : py + fh, px : px + fw]
        np.maximum(region, 0.5 * frag, out=region)
    objs: list[SceneObject] = []
    for _ in range(int(rng.integers(items_range[0], items_range[1] + 1))):
        for _try in range(25):
            j = int(rng.integers(len(images)))
            scale = float(rng.uniform(*scale_range))
            pix, m = _scale_item(images[j], scale, threshold)
            ih, iw = m.shape
            if iw >= w or ih >= h or not m.any():
                continue
            px, py = int(rng.integers(0, w - iw + 1)), int(rng.integers(0, h - ih + 1))
            mask = np.zeros((h, w), bool)
            mask[py : py + ih, px : px + iw] = m
            # cap the overlap with earlier items (both ways) so every item stays mostly visible
            n_pix = mask.sum()
            if any((mask & o.mask).sum() > 0.25 * min(n_pix, o.mask.sum()) for o in objs):
                continue
            gain = rng.uniform(0.8, 1.1)
            # soft edges: the item's dim rim (just above the threshold) blends into the background
            # instead of drawing a dark outline; its body (>= 2x threshold) is opaque
            alpha = np.clip(pix.astype(np.float32) / (2 * threshold), 0, 1) * m
            region = gray[py : py + ih, px : px + iw]
            region += alpha * (np.minimum(pix * gain, 255) - region)
            box = mask_box(mask)
            objs.append(SceneObject(int(labels[j]), mask, [], False, False, box))
            break
    tint = rng.uniform(0.85, 1.15, size=3)
    img = np.clip(gray[..., None] * tint, 0, 255).astype(np.uint8)
    return img, objs


def _as_pool(images_dir_or_arrays) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(images_dir_or_arrays, (str, os.PathLike)) or images_dir_or_arrays is None:
        return load_fashion_mnist(images_dir_or_arrays, "test")
    images, labels = images_dir_or_arrays
    images, labels = np.asarray(images, np.uint8), np.asarray(labels, np.int64)
    if images.ndim != 3 or len(images) != len(labels) or len(images) < 2:
        raise MCLDetError(
            f"item arrays must be Nx28x28 images and N labels with N >= 2, got {images.shape} and "
            f"{labels.shape}; pass the Fashion-MNIST directory instead"
        )
    return images, labels


def make_fashion_scenes(
    out_root: str | os.PathLike,
    images_dir_or_arrays: str | os.PathLike | tuple[np.ndarray, np.ndarray] | None = None,
    num_train: int = 500,
    num_test: int = 200,
    seed: int = 0,
    canvas_range: tuple[int, int] = (160, 256),
    items_range: tuple[int, int] = (2, 5),
) -> Path:
    """Write the scene set (VOC devkit + COCO json) under ``out_root`` and return ``out_root``.

    ``images_dir_or_arrays``: the Fashion-MNIST directory (its t10k split is used; ``None`` = the
    Debian package path) or ``(images Nx28x28 uint8, labels N)``. Deterministic given ``seed``.
    Resumable: when ``out_root/scenes.json`` records the same parameters, nothing is redone.
    """
    out = Path(out_root)
    if num_train < 4 or num_test < 2:
        raise MCLDetError(f"num_train={num_train}, num_test={num_test}: use at least 4 and 2")
    images, labels = _as_pool(images_dir_or_arrays)
    params = {
        "format": SCENES_FORMAT,
        "num_train": int(num_train),
        "num_test": int(num_test),
        "seed": int(seed),
        "canvas_range": [int(v) for v in canvas_range],
        "items_range": [int(v) for v in items_range],
        "pool": [
            int(len(images)),
            int(images.astype(np.int64).sum() % 1_000_003),
            int(labels.sum()),
        ],
        "classes": list(FASHION_MNIST_CLASSES),
    }
    summary = out / "scenes.json"
    if summary.is_file() and json.loads(summary.read_text()).get("params") == params:
        return out
    out.mkdir(parents=True, exist_ok=True)
    summary.unlink(missing_ok=True)
    voc, coco = out / "voc", out / "coco"
    prepare_output_dir(voc, "fashion_scenes_voc", params)
    prepare_output_dir(coco, "fashion_scenes_coco", params)
    half = len(images) // 2  # train scenes: first half of the pool; test scenes: second half
    pools = {"train": (images[:half], labels[:half]), "test": (images[half:], labels[half:])}
    ids: dict[str, list[str]] = {"train": [], "test": []}
    categories = [
        {"id": k + 1, "name": n, "supercategory": "fashion"}
        for k, n in enumerate(FASHION_MNIST_CLASSES)
    ]
    counts = {}
    for si, (split, num) in enumerate((("train", num_train), ("test", num_test))):
        rng = np.random.default_rng([int(seed), 7, si])
        pool_images, pool_labels = pools[split]
        cimages, canns = [], []
        n_obj = 0
        for i in range(num):
            img, objs = render_fashion_scene(
                rng, pool_images, pool_labels, canvas_range, items_range
            )
            h, w = img.shape[:2]
            fid = f"{split}_{i:06d}"
            write_jpeg(voc / "JPEGImages" / f"{fid}.jpg", img)
            xml = voc / "Annotations" / f"{fid}.xml"
            write_voc_annotation(xml, "voc", f"{fid}.jpg", (w, h), objs, FASHION_MNIST_CLASSES)
            ids[split].append(fid)
            img_id = (si + 1) * 1_000_000 + i + 1
            cimages.append({"id": img_id, "file_name": f"{fid}.jpg", "width": w, "height": h})
            for o in objs:
                polys = mask_to_polygons(o.mask)
                if not polys:  # cannot happen for items >= 8 px, but never write an empty segm
                    continue
                n_obj += 1
                canns.append(
                    {
                        "id": len(canns) + 1 + si * 10_000_000,
                        "image_id": img_id,
                        "category_id": o.label + 1,
                        "iscrowd": 0,
                        "bbox": coco_bbox(o.box),
                        "area": float(o.mask.sum()),
                        "segmentation": polys,
                    }
                )
        counts[split] = {"images": num, "objects": n_obj}
        write_coco_json(
            coco / "annotations" / f"instances_{split}.json",
            info={
                "description": "mcl_det Fashion-MNIST detection scenes",
                "version": SCENES_FORMAT,
            },
            licenses=[{"id": 1, "name": "MIT (Fashion-MNIST, Zalando SE)", "url": ""}],
            images=cimages,
            annotations=canns,
            categories=categories,
        )
    write_voc_splits(voc, ids["train"], ids["test"])
    # written last: its presence says the whole set is complete
    atomic_write_text(summary, json.dumps({"params": params, "counts": counts}, indent=2) + "\n")
    return out
