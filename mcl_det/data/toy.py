"""Toy datasets in the real on-disk formats: ImageNet ImageFolder, Pascal VOC devkit, COCO json.

Why: every stage of mcl_det reads *files* in the formats of the real datasets, so the tests and the
demo should exercise those exact formats (and detectron2's own loaders) rather than in-memory fakes.
Everything here is deterministic given a seed and takes a few seconds on one CPU core.

The objects are meant to be *learnable*: four shape classes, each with its own texture, drawn on a
cluttered background (noise, faint lines and blobs):

    shape            texture        VOC name    COCO name (id)
    circle           stripes        aeroplane   airplane (5)
    square           checkerboard   bicycle     bicycle (2)
    triangle         dots           bird        bird (16)
    cross            grid           boat        boat (9)

Real dataset class names are used so that detectron2's builtin dataset names
(``voc_2007_trainval``, ``coco_2017_train``, ...) load these files unchanged when
``DETECTRON2_DATASETS`` points at the toy root: the VOC files only use names from the 20 VOC
classes, and the COCO json lists all 80 COCO categories with their real, non-contiguous ids (objects
are only drawn for the four above). ``make_toy_coco(..., categories="toy")`` writes only those four.

Limits, honestly: masks and boxes are *amodal* (an object partly hidden by a later one keeps its
full extent, as VOC boxes do; real COCO masks cover only the visible part). Overlap is kept small
(intersection <= 30% of the smaller box) so that this rarely matters.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..utils.errors import MCLDetError
from .formats import (
    SceneObject,
    coco_bbox,
    mask_box,
    prepare_output_dir,
    rle_encode_uncompressed,
    write_coco_json,
    write_jpeg,
    write_voc_annotation,
    write_voc_splits,
)

# The 20 Pascal VOC class names, in detectron2's (and the devkit's) order.
VOC_CLASSES: tuple[str, ...] = tuple(
    "aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike "
    "person pottedplant sheep sofa train tvmonitor".split()
)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
TEXTURES: tuple[str, ...] = ("stripes", "checker", "dots", "grid")
# VOC class names of the four toy shapes (all in VOC_CLASSES), in SHAPES order.
TOY_CLASSES: tuple[str, ...] = ("aeroplane", "bicycle", "bird", "boat")
# COCO (id, name) of the four toy shapes, in SHAPES order: real COCO ids, non-contiguous.
TOY_COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (5, "airplane"),
    (2, "bicycle"),
    (16, "bird"),
    (9, "boat"),
)

# Colour pairs (foreground, accent). Appearance k uses shape k % 4 and palette k // 4, so up to
# 16 visually distinct classes exist (used by ImageFolder with num_classes > 4, custom VOC lists).
_PALETTES: tuple[tuple[tuple[int, int, int], ...], ...] = (
    ((220, 40, 40), (250, 220, 60), (40, 90, 220), (30, 170, 60)),
    ((240, 140, 20), (150, 60, 200), (20, 180, 190), (230, 80, 170)),
    ((120, 200, 40), (40, 40, 40), (250, 250, 250), (160, 100, 40)),
    ((60, 60, 180), (200, 200, 90), (200, 60, 100), (90, 160, 140)),
)
_ACCENTS: tuple[tuple[int, int, int], ...] = (
    (250, 250, 250),
    (20, 20, 20),
    (90, 30, 120),
    (250, 200, 200),
)
MAX_APPEARANCES = len(SHAPES) * len(_PALETTES)


# --------------------------------------------------------------------------- drawing


def _shape_polygon(shape: int, cx: float, cy: float, r: float, theta: float) -> np.ndarray:  # Kx2
    """Vertices of a toy shape of 'radius' r centred at (cx, cy), rotated by theta (radians)."""
    if shape == 0:  # circle, as a 32-gon
        t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
        pts = np.stack([np.cos(t), np.sin(t)], 1) * r
    elif shape == 1:  # square
        a = 0.8 * r
        pts = np.array([[-a, -a], [a, -a], [a, a], [-a, a]])
    elif shape == 2:  # equilateral triangle
        t = np.array([-np.pi / 2, np.pi / 6, 5 * np.pi / 6])
        pts = np.stack([np.cos(t), np.sin(t)], 1) * 1.1 * r
    else:  # plus-shaped cross with arms of width 0.7 r
        a, w = r, 0.35 * r
        arm = [[-w, -a], [w, -a], [w, -w], [a, -w], [a, w], [w, w]]  # half the outline ...
        pts = np.array(arm + [[-x, -y] for x, y in arm])  # ... and its point reflection
    c, s = np.cos(theta), np.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    return pts @ rot.T + np.array([cx, cy])


def _clip_polygon(pts: np.ndarray, w: int, h: int) -> np.ndarray:  # Kx2 -> Mx2
    """Sutherland-Hodgman clipping against the image rectangle (a convex window)."""
    out = [tuple(p) for p in pts]
    edges = ((0, 0.0, False), (0, float(w), True), (1, 0.0, False), (1, float(h), True))
    for axis, bound, keep_below in edges:
        if not out:
            break
        src, out = out, []

        def inside(p, axis=axis, bound=bound, keep_below=keep_below):
            return p[axis] <= bound if keep_below else p[axis] >= bound

        for i, cur in enumerate(src):
            prev = src[i - 1]
            if inside(cur):
                if not inside(prev):
                    out.append(_intersect(prev, cur, axis, bound))
                out.append(cur)
            elif inside(prev):
                out.append(_intersect(prev, cur, axis, bound))
    return np.array(out, dtype=np.float64).reshape(-1, 2)


def _intersect(p, q, axis: int, bound: float) -> tuple[float, float]:
    t = (bound - p[axis]) / (q[axis] - p[axis])
    return (p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1]))


def _texture(kind: int, h: int, w: int, theta: float, period: float, fg, accent) -> np.ndarray:
    """HxWx3 uint8 texture pattern (rotated with the object so it looks attached to it)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c, s = np.cos(theta), np.sin(theta)
    u, v = c * xx + s * yy, -s * xx + c * yy
    if kind == 0:  # stripes
        on = np.sin(u * 2 * np.pi / period) > 0
    elif kind == 1:  # checkerboard
        on = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    elif kind == 2:  # dots on a plain field
        du, dv = (u % period) - period / 2, (v % period) - period / 2
        on = du * du + dv * dv > (period * 0.3) ** 2
    else:  # grid lines
        on = ((u % period) > period * 0.3) & ((v % period) > period * 0.3)
    return np.where(on[..., None], np.array(fg, np.uint8), np.array(accent, np.uint8))


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Cluttered but low-contrast background: gradient + noise + faint lines and blobs."""
    base = rng.uniform(70, 180, size=3)
    grad = rng.uniform(-40, 40, size=3)
    yy = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    img = base + grad * yy + rng.normal(0, 12, size=(h, w, 3))
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0, x1, y1 = rng.uniform(0, 1, 4) * [w, h, w, h]
        col = tuple(int(v) for v in rng.integers(0, 256, 3)) + (int(rng.integers(40, 90)),)
        draw.line([(x0, y0), (x1, y1)], fill=col, width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(2, 6))):
        cx, cy = rng.uniform(0, 1, 2) * [w, h]
        rx, ry = rng.uniform(3, 0.15 * min(w, h) + 4, 2)
        col = tuple(int(v) for v in rng.integers(0, 256, 3)) + (int(rng.integers(30, 70)),)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=col)
    canvas.paste(layer, (0, 0), layer)
    return np.asarray(canvas).copy()


def _overlap(a, b) -> float:
    """Intersection over the *smaller* box: a small object may not hide under a large one."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]) + 1)
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    area = lambda r: (r[2] - r[0] + 1) * (r[3] - r[1] + 1)  # noqa: E731
    return ix * iy / float(min(area(a), area(b)))


def _paint(img: np.ndarray, label: int, mask: np.ndarray, theta: float, rng) -> None:
    """Fill mask pixels of img with the texture of appearance `label` (slight colour jitter)."""
    shape, pal = label % len(SHAPES), label // len(SHAPES)
    fg = np.clip(np.array(_PALETTES[pal][shape]) + rng.integers(-20, 21, 3), 0, 255)
    accent = np.clip(np.array(_ACCENTS[pal]) + rng.integers(-20, 21, 3), 0, 255)
    box = mask_box(mask)
    x0, y0, x1, y1 = box
    tex = _texture(shape, y1 - y0 + 1, x1 - x0 + 1, theta, float(rng.uniform(4, 7)), fg, accent)
    sub = mask[y0 : y1 + 1, x0 : x1 + 1]
    img[y0 : y1 + 1, x0 : x1 + 1][sub] = tex[sub]


def _rasterize(poly: np.ndarray, w: int, h: int) -> np.ndarray:
    m = Image.new("L", (w, h), 0)
    ImageDraw.Draw(m).polygon([tuple(p) for p in poly], fill=1)
    return np.asarray(m).astype(bool)


def render_scene(
    rng: np.random.Generator,
    size: tuple[int, int],
    labels: Sequence[int],
    num_objects: int,
    *,
    force_truncated: bool = False,
    force_small: bool = False,
    min_radius: float = 10.0,
    max_radius: float | None = None,
    p_truncated: float = 0.12,
    p_small: float = 0.08,
) -> tuple[np.ndarray, list[SceneObject]]:
    """Draw up to ``num_objects`` toy objects (labels drawn from ``labels``) on a cluttered canvas.

    ``size`` is (width, height). Returns the HxWx3 uint8 image and the objects, in drawing order.
    An object is ``truncated`` when its shape crosses the image border and ``difficult`` when its
    visible box is smaller than 12 px on its longer side (VOC's "hard to recognise" flag).
    """
    w, h = size
    img = _background(rng, h, w)
    max_radius = max_radius or 0.22 * min(w, h)
    objs: list[SceneObject] = []
    for k in range(num_objects):
        truncate = (force_truncated and k == 0) or rng.random() < p_truncated
        small = (force_small and k == 0 and not truncate) or rng.random() < p_small
        for _try in range(30):
            r = float(rng.uniform(4.0, 6.0) if small else rng.uniform(min_radius, max_radius))
            if truncate:  # centre within 0.6 r of a random border: partly outside the image
                cx, cy = float(rng.uniform(r, w - r)), float(rng.uniform(r, h - r))
                side, off = int(rng.integers(4)), float(rng.uniform(-0.6 * r, 0.6 * r))
                if side < 2:
                    cx = off if side == 0 else w - off
                else:
                    cy = off if side == 2 else h - off
            else:
                cx, cy = float(rng.uniform(r + 1, w - r - 1)), float(rng.uniform(r + 1, h - r - 1))
            label = int(labels[int(rng.integers(len(labels)))])
            theta = float(rng.uniform(0, np.pi))
            poly = _shape_polygon(label % len(SHAPES), cx, cy, r, theta)
            clipped = _clip_polygon(poly, w, h)
            if len(clipped) < 3:
                continue
            mask = _rasterize(clipped, w, h)
            box = mask_box(mask)
            if box is None:
                continue
            full_area = np.ptp(poly[:, 0]) * np.ptp(poly[:, 1])
            vis_area = (box[2] - box[0] + 1) * (box[3] - box[1] + 1)
            if vis_area < 0.35 * full_area:  # keep enough of a truncated object to recognise it
                continue
            if any(_overlap(box, o.box) > 0.3 for o in objs):
                continue
            crosses = bool((poly < 0).any() or (poly > [w, h]).any())  # beyond any border
            difficult = max(box[2] - box[0], box[3] - box[1]) + 1 < 12
            _paint(img, label, mask, theta, rng)
            flat = [round(float(v), 2) for v in clipped.reshape(-1)]
            objs.append(SceneObject(label, mask, flat, crosses, difficult, box))
            break
    return img, objs


# --------------------------------------------------------------------------- helpers


def _rng(seed: int, *stream: int) -> np.random.Generator:
    """Independent deterministic stream per (seed, dataset, split)."""
    return np.random.default_rng([int(seed), *stream])


def _check_count(name: str, value: int, minimum: int) -> None:
    if int(value) < minimum:
        raise MCLDetError(f"{name}={value} is too small; use at least {minimum}")


def _size(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    w, h = (int(v) for v in size)
    if w < 32 or h < 32:
        raise MCLDetError(f"toy image size {size} is too small; use at least 32x32 (width, height)")
    return w, h


# --------------------------------------------------------------------------- ImageNet ImageFolder


def make_toy_imagenet(
    root: str | os.PathLike,
    num_classes: int = 4,
    train_per_class: int = 16,
    val_per_class: int = 4,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """ImageNet-style ImageFolder: ``root/{train,val}/nXXXXXXXX/*.JPEG``, one object per image.

    Class k is appearance k (shape k % 4, palette k // 4); folder names are wnid-like
    (``n00000001``...) so that sorted folder order == class index, as torchvision assumes.
    """
    root = Path(root)
    if not 1 <= num_classes <= MAX_APPEARANCES:
        raise MCLDetError(
            f"num_classes={num_classes}: the toy ImageFolder supports 1..{MAX_APPEARANCES}"
        )
    _check_count("train_per_class", train_per_class, 1)
    _check_count("val_per_class", val_per_class, 1)
    w, h = _size(size)
    params = dict(
        num_classes=num_classes,
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        size=[w, h],
        seed=seed,
    )
    prepare_output_dir(root, "imagenet", params)
    # one large object per image, rarely cut by the border, never tiny
    draw = dict(
        min_radius=0.22 * min(w, h), max_radius=0.4 * min(w, h), p_small=0.0, p_truncated=0.1
    )
    for si, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class))):
        rng = _rng(seed, 1, si)
        for k in range(num_classes):
            wnid = f"n{k + 1:08d}"
            for i in range(per_class):
                img, _ = render_scene(rng, (w, h), [k], 1, **draw)
                if split == "train":
                    name = f"{wnid}_{i + 1}.JPEG"
                else:
                    name = f"ILSVRC2012_val_{k * per_class + i + 1:08d}.JPEG"
                write_jpeg(root / split / wnid / name, img)
    return root


# --------------------------------------------------------------------------- Pascal VOC


def _voc_year(
    d: Path,
    year: str,
    num_train: int,
    num_test: int,
    size: tuple[int, int],
    names: Sequence[str],
    drawn: Sequence[int],
    rng: np.random.Generator,
) -> None:
    ids_trainval, ids_test = [], []
    for i in range(num_train + num_test):
        fid = f"{i + 1:06d}" if year == "2007" else f"{year}_{i + 1:06d}"
        split_i = i if i < num_train else i - num_train
        n_obj = int(rng.integers(1, 5))
        # the first image of each split has a truncated object, the second a small one
        img, objs = render_scene(
            rng, size, drawn, n_obj, force_truncated=split_i == 0, force_small=split_i == 1
        )
        write_jpeg(d / "JPEGImages" / f"{fid}.jpg", img)
        xml = d / "Annotations" / f"{fid}.xml"
        write_voc_annotation(xml, f"VOC{year}", f"{fid}.jpg", size, objs, names)
        (ids_trainval if i < num_train else ids_test).append(fid)
    write_voc_splits(d, ids_trainval, ids_test)


def make_toy_voc(
    root: str | os.PathLike,
    years: Sequence[str] = ("2007", "2012"),
    num_train: int = 24,
    num_test: int = 12,
    size: tuple[int, int] = (160, 128),
    classes: Sequence[str] | None = None,
    seed: int = 0,
) -> Path:
    """Pascal VOC devkit(s) ``root/VOC<year>/{JPEGImages,Annotations,ImageSets/Main}``.

    ``num_train`` images form trainval (first half train, second half val) and ``num_test``
    images form test (VOC2007 only, as in the real devkit). ``classes=None`` uses the 20 VOC names
    and draws the four toy shapes as aeroplane/bicycle/bird/boat; a custom list draws its first (up
    to 16) classes. ``size`` is (width, height). Returns ``root``.
    """
    root = Path(root)
    # train/val halves of >= 2 ids each (detectron2 0.6 needs more than one image per split)
    _check_count("num_train", num_train, 4)
    names = list(VOC_CLASSES if classes is None else classes)
    bad = [n for n in names if not n or any(c.isspace() or c == "/" for c in n)]
    if not names or len(set(names)) != len(names) or bad:
        raise MCLDetError(
            f"bad VOC class list {names}; give unique names without spaces or slashes"
        )
    if classes is None:
        drawn = [names.index(c) for c in TOY_CLASSES]
    else:
        drawn = list(range(min(len(names), MAX_APPEARANCES)))
    w, h = _size(size)
    for year in years:
        year = str(year)
        if year not in ("2007", "2012"):
            raise MCLDetError(f"unknown VOC year {year!r}; use 2007 and/or 2012")
        n_test = num_test if year == "2007" else 0
        if year == "2007":
            _check_count("num_test", num_test, 2)
        d = root / f"VOC{year}"
        params = dict(num_train=num_train, num_test=n_test, size=[w, h], classes=names, seed=seed)
        prepare_output_dir(d, f"voc{year}", params)
        _voc_year(d, year, num_train, n_test, (w, h), names, drawn, _rng(seed, 2, int(year)))
    return root


# --------------------------------------------------------------------------- COCO

# The 80 COCO "thing" category names in id order; ids run 1..90 with the ten gaps below, as in
# instances_*2017.json (tests check this against detectron2's builtin metadata).
_COCO_NAMES_CSV = (
    "person,bicycle,car,motorcycle,airplane,bus,train,truck,boat,traffic light,fire hydrant,"
    "stop sign,parking meter,bench,bird,cat,dog,horse,sheep,cow,elephant,bear,zebra,giraffe,"
    "backpack,umbrella,handbag,tie,suitcase,frisbee,skis,snowboard,sports ball,kite,baseball bat,"
    "baseball glove,skateboard,surfboard,tennis racket,bottle,wine glass,cup,fork,knife,spoon,"
    "bowl,banana,apple,sandwich,orange,broccoli,carrot,hot dog,pizza,donut,cake,chair,couch,"
    "potted plant,bed,dining table,toilet,tv,laptop,mouse,remote,keyboard,cell phone,microwave,"
    "oven,toaster,sink,refrigerator,book,clock,vase,scissors,teddy bear,hair drier,toothbrush"
)
COCO_NAMES: tuple[str, ...] = tuple(_COCO_NAMES_CSV.split(","))
_COCO_MISSING_IDS = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
COCO_IDS: tuple[int, ...] = tuple(i for i in range(1, 91) if i not in _COCO_MISSING_IDS)
_COCO_INFO = {
    "description": "mcl_det toy COCO",
    "version": "1.0",
    "year": 2026,
    "contributor": "mcl_det",
    "date_created": "2026-01-01",
}
_COCO_LICENSES = [{"id": 1, "name": "CC0 (synthetic data)", "url": ""}]


def _coco_categories(categories: str) -> list[dict]:
    if categories == "toy":
        return [
            {"id": i, "name": n, "supercategory": "toy"} for i, n in sorted(TOY_COCO_CATEGORIES)
        ]
    if categories != "coco":
        raise MCLDetError(f"categories={categories!r}; use 'coco' (all 80) or 'toy' (the 4 drawn)")
    return [{"id": i, "name": n, "supercategory": "thing"} for i, n in zip(COCO_IDS, COCO_NAMES)]


def _coco_annotation(
    ann_id: int, img_id: int, category_id: int, segmentation, area: float, box, iscrowd: int
) -> dict:
    return {
        "id": ann_id,
        "image_id": img_id,
        "category_id": category_id,
        "segmentation": segmentation,
        "area": area,
        "bbox": coco_bbox(box),
        "iscrowd": iscrowd,
    }


def _coco_split(
    root: Path,
    split: str,
    num: int,
    size: tuple[int, int],
    rng: np.random.Generator,
    first_image_id: int,
) -> tuple[list[dict], list[dict]]:
    """Draw and write one split's images; returns its COCO ``images`` and ``annotations``."""
    from pycocotools import mask as mask_util

    w, h = size
    toy_ids = [cid for cid, _ in TOY_COCO_CATEGORIES]
    images, anns = [], []
    ann_id = first_image_id * 100
    for i in range(num):
        img_id = first_image_id + i
        fname = f"{img_id:012d}.jpg"
        empty = i % 8 == 5  # a few images with no objects at all
        n_obj = 0 if empty else int(rng.integers(1, 5))
        img, objs = render_scene(rng, (w, h), range(len(SHAPES)), n_obj, force_truncated=i == 0)
        crowd = None
        # a crowd: a cluster of tiny same-class shapes
        if i == 1 or (not empty and rng.random() < 0.12):
            crowd = _crowd(img, rng, w, h, objs)
        write_jpeg(root / f"{split}2017" / fname, img)
        images.append(
            {
                "id": img_id,
                "file_name": fname,
                "width": w,
                "height": h,
                "license": 1,
                "date_captured": "2026-01-01 00:00:00",
            }
        )
        for o in objs:
            rles = mask_util.frPyObjects([o.polygon], h, w)
            area = float(mask_util.area(mask_util.merge(rles)))
            ann_id += 1
            cat = toy_ids[o.label]
            anns.append(_coco_annotation(ann_id, img_id, cat, [o.polygon], area, o.box, 0))
        if crowd is not None:
            label, mask = crowd
            ann_id += 1
            rle, area = rle_encode_uncompressed(mask), float(mask.sum())
            anns.append(
                _coco_annotation(ann_id, img_id, toy_ids[label], rle, area, mask_box(mask), 1)
            )
    return images, anns


def _crowd(
    img: np.ndarray, rng: np.random.Generator, w: int, h: int, objs: list[SceneObject]
) -> tuple[int, np.ndarray] | None:
    """Paint a cluster of 4-7 tiny same-class shapes away from other objects; return its union."""
    label = int(rng.integers(len(SHAPES)))
    for _try in range(20):
        cw, ch = float(rng.uniform(30, 50)), float(rng.uniform(24, 40))
        cx0, cy0 = float(rng.uniform(0, w - cw)), float(rng.uniform(0, h - ch))
        region = (int(cx0), int(cy0), int(cx0 + cw), int(cy0 + ch))
        if all(_overlap(region, o.box) < 0.05 for o in objs):
            break
    else:
        return None
    union = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(4, 8))):
        r = float(rng.uniform(3.5, 5.5))
        cx, cy = cx0 + r + rng.uniform(0, cw - 2 * r), cy0 + r + rng.uniform(0, ch - 2 * r)
        theta = float(rng.uniform(0, np.pi))
        m = _rasterize(_shape_polygon(label, cx, cy, r, theta), w, h)
        _paint(img, label, m, theta, rng)
        union |= m
    return label, union


def make_toy_coco(
    root: str | os.PathLike,
    num_train: int = 24,
    num_val: int = 12,
    size: tuple[int, int] = (160, 128),
    seed: int = 0,
    categories: str = "coco",
) -> Path:
    """COCO layout ``root/coco/{train2017,val2017}/*.jpg`` + ``annotations/instances_*2017.json``.

    Normal objects have polygon masks; each split has ``iscrowd=1`` clusters with uncompressed RLE
    masks; every 8th image (index 5, 13, ...) has no objects. ``categories="coco"`` (default) lists
    the 80 COCO categories (real, non-contiguous ids) so that the builtin ``coco_2017_*`` names load
    these files; ``"toy"`` lists only the four drawn ones (ids 2, 5, 9, 16). Returns ``root``
    (the ``DETECTRON2_DATASETS`` root, as make_toy_voc).
    """
    root = Path(root)
    _check_count("num_train", num_train, 2)
    _check_count("num_val", num_val, 2)
    w, h = _size(size)
    cats = _coco_categories(categories)
    d = root / "coco"
    params = dict(
        num_train=num_train, num_val=num_val, size=[w, h], seed=seed, categories=categories
    )
    prepare_output_dir(d, "coco", params)
    for si, (split, num) in enumerate((("train", num_train), ("val", num_val))):
        first_id = (si + 1) * 100000
        images, anns = _coco_split(d, split, num, (w, h), _rng(seed, 3, si), first_id)
        write_coco_json(
            d / "annotations" / f"instances_{split}2017.json",
            info=_COCO_INFO,
            licenses=_COCO_LICENSES,
            images=images,
            annotations=anns,
            categories=cats,
        )
    return root


def make_all_toy(root: str | os.PathLike, seed: int = 0) -> None:
    """Everything the demo and the tests need: ``root/imagenet``, ``root/VOC2007``, ``root/VOC2012``
    and ``root/coco``, laid out for ``DETECTRON2_DATASETS=root``."""
    root = Path(root)
    make_toy_imagenet(root / "imagenet", seed=seed)
    make_toy_voc(root, seed=seed)
    make_toy_coco(root, seed=seed)
