#!/usr/bin/env python
"""The whole MCL-vs-baseline comparison as one study: the command ``mcl_det.cli.study`` (see
``tools/study.py --help``): run, status, plan, report."""

from mcl_det.cli.run import run_main
from mcl_det.cli.study import main

if __name__ == "__main__":
    run_main(main)
