#!/usr/bin/env python
"""AP tables (mean ± std over seeds, deltas vs the baseline), plots and pretraining monitors from
run folders. Usage: python tools/report.py RUN_DIR_OR_GLOB... [--help]"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mcl_det.report import main  # noqa: E402
from mcl_det.utils.cli import run_main  # noqa: E402

if __name__ == "__main__":
    run_main(main)
