#!/usr/bin/env python
"""Fine-tune + evaluate a detector with detectron2 (VOC Faster R-CNN, COCO Mask R-CNN).

    python tools/train_net.py --config-file detection_configs/voc_faster_rcnn_mcl.yaml \
        [--num-gpus N] [--resume] [--eval-only] [--trials N] [--unsafe-load] [KEY VALUE ...]

--unsafe-load: read MODEL.WEIGHTS even when it needs full unpickling (can run code: only for
files you trust).

Writes OUTPUT_DIR/{config.yaml, results.json, metrics.json, model_final.pth, events.*}.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mcl_det.utils.cli import run_main  # noqa: E402


def main() -> int:
    from mcl_det.detection.train import main as train_main

    return train_main(sys.argv[1:])


if __name__ == "__main__":
    run_main(main)
