#!/usr/bin/env python
"""AP tables (mean ± std over seeds, deltas vs the baseline), plots and pretraining monitors from
run folders. Usage: python tools/report.py RUN_DIR_OR_GLOB... [--help]"""

from mcl_det.report import main
from mcl_det.utils.cli import run_main

if __name__ == "__main__":
    run_main(main)
