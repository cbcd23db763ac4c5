"""Generate the toy datasets (ImageNet ImageFolder, VOC2007/2012 devkits, COCO) under --root.

    python tools/make_toy_data.py --root datasets/toy [--seed 0] [--what all|imagenet|voc|coco]

Then ``DETECTRON2_DATASETS=datasets/toy`` makes detectron2's builtin names (voc_2007_trainval,
coco_2017_train, ...) read them; pretraining reads ``datasets/toy/imagenet``.

Fashion-MNIST (needs the idx files: Debian package ``dataset-fashion-mnist``, or --fashion-dir):

    python tools/make_toy_data.py --root datasets/fashion --what fashion-scenes \
        [--fashion-dir /usr/share/datasets/fashion-mnist] [--num-train 500] [--num-test 200]
    python tools/make_toy_data.py --root datasets/fashion --what fashion-imagefolder \
        [--limit-per-class N]

write ``ROOT/scenes/{voc,coco}`` (detection) and ``ROOT/imagefolder/{train,val}`` (pretraining).
"""

from __future__ import annotations

import argparse
import os
import time

from .run import run_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="datasets/toy", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--what",
        choices=("all", "imagenet", "voc", "coco", "fashion-scenes", "fashion-imagefolder"),
        default="all",
    )
    parser.add_argument("--fashion-dir", default=None, help="Fashion-MNIST idx files directory")
    parser.add_argument("--num-train", type=int, default=500, help="fashion-scenes: train scenes")
    parser.add_argument("--num-test", type=int, default=200, help="fashion-scenes: test scenes")
    parser.add_argument(
        "--limit-per-class", type=int, default=None, help="fashion-imagefolder: train images"
    )
    parser.add_argument(
        "--val-limit-per-class", type=int, default=None, help="fashion-imagefolder: val images"
    )
    args = parser.parse_args(argv)

    from ..data import toy

    t0 = time.perf_counter()
    if args.what == "all":
        toy.make_all_toy(args.root, seed=args.seed)
    elif args.what == "imagenet":
        toy.make_toy_imagenet(os.path.join(args.root, "imagenet"), seed=args.seed)
    elif args.what == "voc":
        toy.make_toy_voc(args.root, seed=args.seed)
    elif args.what == "coco":
        toy.make_toy_coco(args.root, seed=args.seed)
    elif args.what == "fashion-scenes":
        from ..data.scenes import make_fashion_scenes

        fm_dir = _fashion_dir(args.fashion_dir)
        out = os.path.join(args.root, "scenes")
        make_fashion_scenes(out, fm_dir, args.num_train, args.num_test, seed=args.seed)
    else:
        from ..data.fashion_mnist import export_imagefolder

        fm_dir = _fashion_dir(args.fashion_dir)
        out = os.path.join(args.root, "imagefolder")
        export_imagefolder(out, fm_dir, args.limit_per_class, args.val_limit_per_class)
    seconds = time.perf_counter() - t0
    print(f"data ({args.what}, seed {args.seed}) written to {args.root} in {seconds:.1f} s")
    return 0


def _fashion_dir(path: str | None) -> str:
    from ..data.fashion_mnist import ensure_fashion_mnist

    return str(ensure_fashion_mnist(path))


if __name__ == "__main__":
    run_main(main)
