#!/usr/bin/env python
"""Submit pretraining or detection to SLURM with submitit; requeued and resumed on preemption
(the command ``mcl_det.cli.submit``).

    python tools/submit.py detect --nodes 1 --gpus-per-node 8 --partition P --time 1440 \\
        -- --config-file detection_configs/voc_faster_rcnn_mcl.yaml OUTPUT_DIR output/voc_mcl
    python tools/submit.py pretrain --nodes 4 --gpus-per-node 8 --account A --sbatch qos=high \\
        -- --config-file pretrain/configs/moco_v2_mcl_r50x2_200ep.yaml OUTPUT_DIR output/mcl
"""

from mcl_det.cli.run import run_main
from mcl_det.cli.submit import main

if __name__ == "__main__":
    run_main(main)
