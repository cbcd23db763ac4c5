#!/usr/bin/env python
"""AP tables, plots and pretraining monitors from run folders: the command
``mcl_det.cli.report``. Usage: python tools/report.py RUN_DIR_OR_GLOB... [--help]"""

from mcl_det.cli.report import main
from mcl_det.cli.run import run_main

if __name__ == "__main__":
    run_main(main)
