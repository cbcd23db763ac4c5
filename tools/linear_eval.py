"""Linear evaluation of one cohort member: the command ``mcl_det.cli.linear_eval``."""

from mcl_det.cli.linear_eval import main
from mcl_det.cli.run import run_main

if __name__ == "__main__":
    run_main(main)
