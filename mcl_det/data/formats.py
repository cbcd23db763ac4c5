"""The on-disk dataset formats the generators write: Pascal VOC devkit, COCO json, JPEG images.

Why one module: the toy generator (toy.py) and the Fashion-MNIST scene generator (scenes.py) write
the same formats, and detectron2's own loaders read both back; each format detail (VOC's 1-based
inclusive boxes, COCO's x-y-w-h boxes and column-major RLE, the split files) is written here once.
Every file is written atomically (mcl_det.utils.io), so an interrupted generator never leaves a
half-written file that a later run would take for a finished one.
"""

from __future__ import annotations

import io
import json
import shutil
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..utils.errors import MCLDetError
from ..utils.io import atomic_write_bytes

# Written into every generated directory: regeneration may empty only directories carrying it.
GENERATED_MARKER = ".mcl_det_toy.json"


@dataclass
class SceneObject:
    """One drawn object as the annotation formats record it."""

    label: int  # index into the class-name list the writers are given
    mask: np.ndarray  # HxW bool, the full (amodal) shape clipped to the image
    polygon: list[float]  # flat [x1, y1, x2, y2, ...], clipped to the image; [] when unused
    truncated: bool
    difficult: bool
    # x0, y0, x1, y1: inclusive pixel indices of the mask's extent (tight box)
    box: tuple[int, int, int, int] = (0, 0, 0, 0)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight box (x0, y0, x1, y1, inclusive pixel indices) of a HxW mask; None when it is empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def prepare_output_dir(d: Path, what: str, params: dict) -> None:
    """Empty ``d`` for regeneration, but refuse to touch a directory we did not generate.

    Why: ``--root`` may by mistake point at a real dataset; regenerating toy data must never delete
    real data. A marker file records that (and how) the directory was generated.
    """
    if d.exists() and any(d.iterdir()):
        if not (d / GENERATED_MARKER).is_file():
            raise MCLDetError(
                f"{d} exists and was not made by make_toy_data ({what}); "
                "choose another --root or remove that directory yourself"
            )
        shutil.rmtree(d)
    d.mkdir(parents=True, exist_ok=True)
    marker = json.dumps({"what": what, **params}, sort_keys=True) + "\n"
    atomic_write_bytes(d / GENERATED_MARKER, marker.encode())


# --------------------------------------------------------------------------- images


def write_jpeg(path: Path, img: np.ndarray, quality: int = 92) -> None:
    """An HxWx3 uint8 image as a JPEG file."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------- Pascal VOC


def write_voc_annotation(
    path: Path,
    folder: str,
    filename: str,
    size: tuple[int, int],
    objects: Sequence[SceneObject],
    names: Sequence[str],
) -> None:
    """``Annotations/<id>.xml`` of one image of ``size`` (width, height), in the devkit's layout."""
    w, h = size
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = folder
    ET.SubElement(ann, "filename").text = filename
    src = ET.SubElement(ann, "source")
    ET.SubElement(src, "database").text = "mcl_det toy database"
    ET.SubElement(src, "annotation").text = "mcl_det toy generator"
    sz = ET.SubElement(ann, "size")
    ET.SubElement(sz, "width").text = str(w)
    ET.SubElement(sz, "height").text = str(h)
    ET.SubElement(sz, "depth").text = "3"
    ET.SubElement(ann, "segmented").text = "0"
    for o in objects:
        ob = ET.SubElement(ann, "object")
        ET.SubElement(ob, "name").text = names[o.label]
        ET.SubElement(ob, "pose").text = "Unspecified"
        ET.SubElement(ob, "truncated").text = str(int(o.truncated))
        ET.SubElement(ob, "difficult").text = str(int(o.difficult))
        bb = ET.SubElement(ob, "bndbox")
        # VOC boxes are 1-based inclusive pixel indices: xmin=1, xmax=W covers the whole width.
        x0, y0, x1, y1 = o.box
        for tag, v in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1 + 1), ("ymax", y1 + 1)):
            ET.SubElement(bb, tag).text = str(v)
    ET.indent(ann, space="\t")
    atomic_write_bytes(path, ET.tostring(ann, encoding="utf-8") + b"\n")


def write_voc_splits(devkit: Path, trainval: Sequence[str], test: Sequence[str]) -> None:
    """``ImageSets/Main/{train,val,trainval,test}.txt``: train is the first half of trainval and
    val the second; test.txt is written only when there are test ids (as in the VOC2012 devkit)."""
    main = devkit / "ImageSets" / "Main"
    half = len(trainval) // 2
    splits = {"train": trainval[:half], "val": trainval[half:], "trainval": trainval, "test": test}
    for name, ids in splits.items():
        if name != "test" or ids:
            atomic_write_bytes(main / f"{name}.txt", "".join(i + "\n" for i in ids).encode())


# --------------------------------------------------------------------------- COCO


def coco_bbox(box: tuple[int, int, int, int]) -> list[float]:
    """COCO ``[x, y, width, height]`` of an inclusive pixel box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    return [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)]


def rle_encode_uncompressed(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE of an HxW mask: run lengths over the column-major (Fortran) pixel
    order, starting with a run of zeros (possibly empty), as in COCO's iscrowd annotations."""
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).reshape(-1, order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"counts": [int(c) for c in counts], "size": [int(h), int(w)]}


def write_coco_json(
    path: Path,
    *,
    info: dict,
    licenses: list[dict],
    images: list[dict],
    annotations: list[dict],
    categories: list[dict],
) -> None:
    """An ``instances_*.json`` file with the five top-level keys of COCO's, in COCO's order."""
    data = {
        "info": info,
        "licenses": licenses,
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    atomic_write_bytes(path, json.dumps(data).encode())
