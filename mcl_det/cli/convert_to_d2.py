"""Export one MCL cohort member (or a MoCo / torchvision ResNet) to detectron2 weights.

    python tools/convert_to_d2.py INPUT OUTPUT.pkl [--member K|best] [--list] [--no-verify]
                                  [--unsafe-load]

Writes OUTPUT.pkl and OUTPUT.yaml (the detectron2 settings the weights need) only after the
conversion was verified against torchvision. All logic lives in mcl_det/convert.py.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .run import run_main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("input", help="checkpoint: mcl_det pretraining, MoCo, or torchvision ResNet")
    p.add_argument("output", nargs="?", help="detectron2 weights to write (must end with .pkl)")
    p.add_argument("--member", default="0", help="member index K, or 'best' (default: 0)")
    p.add_argument("--list", action="store_true", help="list the members and exit")
    p.add_argument("--no-verify", action="store_true", help="skip the numerical verification")
    p.add_argument("--quiet", action="store_true", help="do not log the key mapping")
    p.add_argument(
        "--unsafe-load",
        action="store_true",
        help="unpickle an input that holds Python objects beyond tensors and plain containers;\n"
        "unpickling can run code: only for files you trust",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # detectron2/fvcore repeat the mapping as a table; keep their warnings only.
    for name in ("detectron2", "fvcore"):
        logging.getLogger(name).setLevel(logging.WARNING)

    from .. import convert
    from ..utils.errors import MCLDetError
    from ..utils.rundir import check_output_path

    if args.list:
        members = convert.read_checkpoint(args.input, args.unsafe_load).members
        print(convert.format_member_table(members))
        return 0
    if not args.output:
        raise MCLDetError("missing OUTPUT (a .pkl path); or use --list to see the members")
    check_output_path(args.output, "file", "OUTPUT")  # before the conversion, not after it
    report = convert.convert_checkpoint(
        args.input, args.output, args.member, not args.no_verify, args.unsafe_load
    )
    if args.member.strip().lower() == "best":
        print(f"--member best: picked member {report.member} ({report.arch}, {report.metric})")
    print(report.summary())
    return 0


if __name__ == "__main__":
    run_main(main)
