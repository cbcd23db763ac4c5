"""Toy datasets: real on-disk layouts, read back by detectron2's / torchvision's / pycocotools' own
loaders, deterministic per seed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mcl_det.data.formats import rle_encode_uncompressed
from mcl_det.data.toy import (
    TOY_CLASSES,
    VOC_CLASSES,
    make_all_toy,
    make_toy_coco,
    make_toy_voc,
)
from mcl_det.utils.errors import MCLDetError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    make_all_toy(root, seed=0)
    return root


def _tree_digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(d)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- ImageNet


def test_imagenet_imagefolder(toy):
    from torchvision.datasets import ImageFolder

    train = ImageFolder(str(toy / "imagenet" / "train"))
    val = ImageFolder(str(toy / "imagenet" / "val"))
    assert train.classes == ["n00000001", "n00000002", "n00000003", "n00000004"]
    assert val.classes == train.classes
    assert len(train) == 4 * 16 and len(val) == 4 * 4
    assert all(p.endswith(".JPEG") for p, _ in train.samples)
    assert np.bincount([t for _, t in train.samples]).tolist() == [16] * 4
    img, _ = train[0]
    assert img.size == (64, 64) and img.mode == "RGB"


# --------------------------------------------------------------------------- VOC


def test_voc_layout_and_xml_fields(toy):
    for year, n_trainval, n_test in (("2007", 24, 12), ("2012", 24, 0)):
        d = toy / f"VOC{year}"
        main = d / "ImageSets" / "Main"
        splits = {s: (main / f"{s}.txt").read_text().split() for s in ("train", "val", "trainval")}
        assert len(splits["trainval"]) == n_trainval
        assert splits["train"] + splits["val"] == splits["trainval"]
        if n_test:
            splits["test"] = (main / "test.txt").read_text().split()
            assert len(splits["test"]) == n_test
            assert not set(splits["test"]) & set(splits["trainval"])
        flags = {"truncated": 0, "difficult": 0}
        for fid in splits["trainval"] + splits.get("test", []):
            root = ET.parse(d / "Annotations" / f"{fid}.xml").getroot()
            assert root.tag == "annotation"
            assert root.findtext("filename") == f"{fid}.jpg"
            w, h = int(root.findtext("size/width")), int(root.findtext("size/height"))
            assert root.findtext("size/depth") == "3"
            with Image.open(d / "JPEGImages" / f"{fid}.jpg") as im:
                assert im.size == (w, h) == (160, 128)
            objs = root.findall("object")
            assert 1 <= len(objs) <= 4
            for ob in objs:
                assert ob.findtext("name") in TOY_CLASSES and ob.findtext("name") in VOC_CLASSES
                assert ob.findtext("pose") == "Unspecified"
                corners = ("xmin", "ymin", "xmax", "ymax")
                x0, y0, x1, y1 = (int(ob.findtext(f"bndbox/{k}")) for k in corners)
                assert 1 <= x0 <= x1 <= w and 1 <= y0 <= y1 <= h  # 1-based, inclusive
                trunc, diff = int(ob.findtext("truncated")), int(ob.findtext("difficult"))
                assert trunc in (0, 1) and diff in (0, 1)
                if trunc:  # a truncated object is cut by the border: its box touches it
                    assert x0 == 1 or y0 == 1 or x1 == w or y1 == h
                flags["truncated"] += trunc
                flags["difficult"] += diff
        assert flags["truncated"] > 0 and flags["difficult"] > 0, flags


def test_voc_detectron2_loader(toy):
    from detectron2.data.datasets.pascal_voc import CLASS_NAMES, load_voc_instances

    for year, split, n in (("2007", "trainval", 24), ("2007", "test", 12), ("2012", "train", 12)):
        d = toy / f"VOC{year}"
        dicts = load_voc_instances(str(d), split, CLASS_NAMES)
        assert len(dicts) == n
        n_xml = sum(
            len(ET.parse(d / "Annotations" / f"{r['image_id']}.xml").getroot().findall("object"))
            for r in dicts
        )
        assert sum(len(r["annotations"]) for r in dicts) == n_xml
        for r in dicts:
            assert os.path.isfile(r["file_name"])
            for a in r["annotations"]:
                x0, y0, x1, y1 = a["bbox"]
                assert 0 <= x0 < x1 <= r["width"] and 0 <= y0 < y1 <= r["height"]
                assert CLASS_NAMES[a["category_id"]] in TOY_CLASSES


def test_voc_box_is_tight_around_object_pixels(tmp_path):
    # The box written to VOC/COCO is the exact pixel extent of the object's mask (not padded).
    from mcl_det.data.toy import render_scene

    rng = np.random.default_rng(3)
    for _ in range(10):
        _, objs = render_scene(rng, (96, 96), [0, 1, 2, 3], 3)
        for o in objs:
            ys, xs = np.nonzero(o.mask)
            assert o.box == (xs.min(), ys.min(), xs.max(), ys.max())


def test_voc_custom_classes(tmp_path):
    names = ["t-shirt", "trouser", "pullover", "dress", "coat"]
    make_toy_voc(tmp_path, years=("2007",), num_train=8, num_test=4, classes=names, seed=1)
    from detectron2.data.datasets.pascal_voc import load_voc_instances

    dicts = load_voc_instances(str(tmp_path / "VOC2007"), "trainval", names)
    assert len(dicts) == 8
    assert {a["category_id"] for r in dicts for a in r["annotations"]} <= set(range(5))
    assert not (tmp_path / "VOC2012").exists()


# --------------------------------------------------------------------------- COCO


def test_coco_json_and_detectron2_loader(toy):
    from detectron2.data.datasets import load_coco_json
    from pycocotools import mask as mask_util

    for split, n in (("train", 24), ("val", 12)):
        jpath = toy / "coco" / "annotations" / f"instances_{split}2017.json"
        data = json.loads(jpath.read_text())
        assert set(data) >= {"info", "licenses", "images", "annotations", "categories"}
        cat_ids = sorted(c["id"] for c in data["categories"])
        assert len(cat_ids) == 80 and cat_ids != list(range(1, 81))  # real, non-contiguous ids
        used = {a["category_id"] for a in data["annotations"]}
        assert used <= set(cat_ids) and len(used) >= 2
        assert used != set(range(1, len(used) + 1))
        assert len(data["images"]) == n
        img_ids = {im["id"] for im in data["images"]}
        with_ann = {a["image_id"] for a in data["annotations"]}
        assert with_ann <= img_ids and len(img_ids - with_ann) >= 1  # some empty images
        assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
        crowd = [a for a in data["annotations"] if a["iscrowd"]]
        assert crowd, "each split has at least one crowd annotation"
        size = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
        for a in data["annotations"]:
            h, w = size[a["image_id"]]
            x, y, bw, bh = a["bbox"]
            assert 0 <= x and 0 <= y and bw > 0 and bh > 0 and x + bw <= w and y + bh <= h
            if a["iscrowd"]:
                seg = a["segmentation"]
                assert isinstance(seg["counts"], list) and seg["size"] == [h, w]
                rle = mask_util.frPyObjects(seg, h, w)
            else:
                assert isinstance(a["segmentation"], list) and len(a["segmentation"][0]) >= 6
                rle = mask_util.merge(mask_util.frPyObjects(a["segmentation"], h, w))
            m = mask_util.decode(rle)
            assert m.shape == (h, w)
            assert abs(float(m.sum()) - a["area"]) <= 0.5
            ys, xs = np.nonzero(m)  # the mask lies inside the box (1 px slack: polygon rasterising)
            assert xs.min() >= x - 1 and xs.max() <= x + bw
            assert ys.min() >= y - 1 and ys.max() <= y + bh
        # detectron2's own loader: same images and instances, ids mapped to a contiguous range
        image_root = str(toy / "coco" / f"{split}2017")
        dicts = load_coco_json(str(jpath), image_root, f"toy_coco_{split}_test")
        assert len(dicts) == n
        assert sum(len(r["annotations"]) for r in dicts) == len(data["annotations"])
        assert all(os.path.isfile(r["file_name"]) for r in dicts)
        from detectron2.data import MetadataCatalog

        meta = MetadataCatalog.get(f"toy_coco_{split}_test")
        assert sorted(meta.thing_dataset_id_to_contiguous_id) == cat_ids


def test_coco_category_list_matches_detectron2():
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    from mcl_det.data.toy import COCO_IDS, COCO_NAMES, TOY_COCO_CATEGORIES

    ref = [(c["id"], c["name"]) for c in COCO_CATEGORIES if c["isthing"]]
    assert list(zip(COCO_IDS, COCO_NAMES)) == ref
    assert set(TOY_COCO_CATEGORIES) <= set(ref)


def test_coco_toy_categories(tmp_path):
    d = make_toy_coco(tmp_path, num_train=6, num_val=4, seed=2, categories="toy")
    assert d == tmp_path
    data = json.loads((d / "coco" / "annotations" / "instances_train2017.json").read_text())
    assert sorted(c["id"] for c in data["categories"]) == [2, 5, 9, 16]


def test_rle_encoder_matches_loop_and_pycocotools():
    from pycocotools import mask as mask_util

    rng = np.random.default_rng(0)
    for first in (0, 1):
        m = rng.random((7, 5)) < 0.4
        m[0, 0] = bool(first)
        # direct loop over the column-major pixel order, counting runs that alternate 0,1,0,...
        counts, cur, run = [], 0, 0
        for x in range(m.shape[1]):
            for y in range(m.shape[0]):
                if int(m[y, x]) == cur:
                    run += 1
                else:
                    counts.append(run)
                    cur, run = 1 - cur, 1
        counts.append(run)
        rle = rle_encode_uncompressed(m)
        assert rle["counts"] == counts and rle["size"] == [7, 5]
        dec = mask_util.decode(mask_util.frPyObjects(rle, 7, 5))
        assert np.array_equal(dec.astype(bool), m)


# --------------------------------------------------------------------------- builtin names, CLI


def test_builtin_detectron2_names_resolve(toy):
    code = (
        "from detectron2.data import DatasetCatalog as C\n"
        "print(len(C.get('voc_2007_trainval')), len(C.get('voc_2007_test')), "
        "len(C.get('voc_2012_trainval')), len(C.get('coco_2017_train')), "
        "len(C.get('coco_2017_val')))"
    )
    env = {**os.environ, "DETECTRON2_DATASETS": str(toy)}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["24", "12", "24", "24", "12"]


def test_determinism(tmp_path):
    a = make_toy_voc(tmp_path / "a", years=("2007",), num_train=4, num_test=2, seed=5)
    b = make_toy_voc(tmp_path / "b", years=("2007",), num_train=4, num_test=2, seed=5)
    c = make_toy_voc(tmp_path / "c", years=("2007",), num_train=4, num_test=2, seed=6)
    da, db, dc = (_tree_digest(p / "VOC2007") for p in (a, b, c))
    assert da == db and da != dc
    ca = make_toy_coco(tmp_path / "a", num_train=3, num_val=2, seed=5, categories="toy")
    cb = make_toy_coco(tmp_path / "b", num_train=3, num_val=2, seed=5, categories="toy")
    cc = make_toy_coco(tmp_path / "c", num_train=3, num_val=2, seed=6, categories="toy")
    assert _tree_digest(ca / "coco") == _tree_digest(cb / "coco") != _tree_digest(cc / "coco")
    # regenerating in place is allowed (the directory carries the generator's marker)
    make_toy_voc(tmp_path / "a", years=("2007",), num_train=4, num_test=2, seed=5)
    assert _tree_digest(tmp_path / "a" / "VOC2007") == da


def test_refuses_to_overwrite_foreign_directory(tmp_path):
    real = tmp_path / "VOC2007"
    real.mkdir()
    (real / "precious.txt").write_text("real data")
    with pytest.raises(MCLDetError, match="not made by make_toy_data"):
        make_toy_voc(tmp_path, years=("2007",))
    assert (real / "precious.txt").read_text() == "real data"
    with pytest.raises(MCLDetError, match="too small"):
        make_toy_voc(tmp_path / "x", num_train=2)


def test_cli(tmp_path):
    tool = str(ROOT / "tools" / "make_toy_data.py")
    base = [sys.executable, tool, "--root", str(tmp_path)]
    r = subprocess.run([*base, "--what", "voc", "--seed", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "VOC2007" / "ImageSets" / "Main" / "test.txt").is_file()
    (tmp_path / "coco").mkdir()
    (tmp_path / "coco" / "mine.json").write_text("{}")
    r = subprocess.run([*base, "--what", "coco"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in r.stderr
