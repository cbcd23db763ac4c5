#!/usr/bin/env python
"""Generate the toy / Fashion-MNIST datasets: the command ``mcl_det.cli.make_toy_data``."""

from mcl_det.cli.make_toy_data import main
from mcl_det.cli.run import run_main

if __name__ == "__main__":
    run_main(main)
