#!/usr/bin/env python
"""Export a cohort member to detectron2 weights: the command ``mcl_det.cli.convert_to_d2``."""

from mcl_det.cli.convert_to_d2 import main
from mcl_det.cli.run import run_main

if __name__ == "__main__":
    run_main(main)
