"""``tools/study.py``: the whole MCL-vs-baseline transfer comparison as one command.

    tools/study.py run SPEC [KEY VALUE ...] [--cluster local|slurm] [--jobs N] [--force] ...
    tools/study.py status SPEC_OR_STUDY_DIR
    tools/study.py plan SPEC [KEY VALUE ...]
    tools/study.py report SPEC_OR_STUDY_DIR

``run`` again continues a study: finished stages are kept, failed or stopped ones rerun from
their last checkpoint. The spec format is mcl_det/study/spec.py's; docs/GETTING_STARTED.md has a
walk-through.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..utils.errors import MCLDetError
from .run import run_main

COMMANDS = ("run", "status", "plan", "report")


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"tools/study.py {command}",
        description={
            "run": "Run (or continue) a study: pretraining -> export -> detection -> report.",
            "status": "One row per stage: state, SLURM job, time, log.",
            "plan": "The stage graph, the SLURM jobs and the GPU-hours it implies.",
            "report": "(Re)write the study's report from the trials finished so far.",
        }[command],
    )
    what = "SPEC_OR_STUDY_DIR" if command in ("status", "report") else "SPEC"
    p.add_argument("spec", metavar=what, help="the study spec (YAML), or a study folder")
    p.add_argument("opts", nargs="*", metavar="KEY VALUE", help="spec overrides")
    if command != "run":
        return p
    p.add_argument("--cluster", choices=("local", "slurm"), default="local")
    p.add_argument("--jobs", type=int, default=1, help="local: stages run at once (default 1)")
    p.add_argument(
        "--force",
        action="store_true",
        help="rerun finished stages made stale by a spec or config change (their outputs are "
        "replaced); without it such a change is refused",
    )
    p.add_argument(
        "--keep-going",
        action="store_true",
        help="local: after a failure, still run every stage that does not depend on it",
    )
    p.add_argument("--partition", help="SLURM partition (default: SLURM.PARTITION)")
    p.add_argument("--account", help="SLURM account (default: SLURM.ACCOUNT)")
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra sbatch option for every job, repeatable (e.g. qos=high)",
    )
    p.add_argument("--wait", action="store_true", help="slurm: wait until every job has ended")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        raise MCLDetError(f"unknown study command {command!r}; use one of {', '.join(COMMANDS)}")
    a = _parser(command).parse_intermixed_args(rest)
    from ..study import commands

    if command == "status":
        print(commands.status(a.spec, a.opts))
    elif command == "plan":
        print(commands.plan_text(a.spec, a.opts))
    elif command == "report":
        print(f"wrote {commands.write_report(a.spec)}")
    elif a.cluster == "local":
        return commands.run_local(a.spec, a.opts, a.jobs, a.force, a.keep_going)
    else:
        return commands.run_slurm(a.spec, a.opts, a.force, a.partition, a.account, a.sbatch, a.wait)
    return 0


if __name__ == "__main__":
    run_main(main)
