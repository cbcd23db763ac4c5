"""MCL cohort pretraining: the command ``mcl_det.cli.pretrain`` (see its --help).

Without --config-file it trains the toy config beside this file, configs/toy.yaml.
"""

from mcl_det.cli.pretrain import main
from mcl_det.cli.run import run_main

if __name__ == "__main__":
    run_main(main)
