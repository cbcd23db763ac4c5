#!/usr/bin/env python
"""Fine-tune + evaluate a detector: the command ``mcl_det.cli.train_net`` (see its --help)."""

from mcl_det.cli.run import run_main
from mcl_det.cli.train_net import main

if __name__ == "__main__":
    run_main(main)
