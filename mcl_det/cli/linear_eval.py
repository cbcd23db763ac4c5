"""Linear evaluation of one cohort member: ``python tools/linear_eval.py CKPT --member K``.

MoCo protocol (frozen backbone in eval mode, lr 30, 100 epochs, steps 60/80, wd 0); the config is
the one stored in the checkpoint, overridable with --config-file and trailing KEY VALUE pairs
(LINEAR.*, DATA.ROOT, ...); flags may come before or after the checkpoint. Writes
OUTPUT_DIR/linear_eval.json (default: next to the checkpoint).
"""

import argparse
import json

from .run import run_main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("checkpoint", help="pretraining checkpoint (checkpoint_last.pth)")
    p.add_argument("--member", type=int, default=0, help="cohort member index")
    p.add_argument("--config-file", default=None)
    p.add_argument("--output-dir", default=None)
    p.add_argument(
        "--unsafe-load",
        action="store_true",
        help="unpickle a checkpoint holding Python objects beyond tensors and plain values "
        "(unpickling can run code: only for files you trust)",
    )
    p.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides")
    # intermixed: `CKPT --member 1 DATA.ROOT /x` as well as `--member 1 CKPT DATA.ROOT /x`
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from ..pretrain.linear_eval import run_linear_eval

    result = run_linear_eval(
        a.checkpoint, a.member, a.config_file, a.opts, a.output_dir, unsafe_load=a.unsafe_load
    )
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    run_main(main)
