"""The smallest real study (toy data, two arms, one VOC protocol with two trials), shared by the
local and the SLURM study tests."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

PRETRAIN_OPTS = [
    "SOLVER.MAX_ITER", 3, "SOLVER.IMS_PER_BATCH", 8, "MODEL.QUEUE_SIZE", 16, "MODEL.DIM", 16,
    "DATA.IMAGE_SIZE", 32, "MONITOR.PROGRESS", False, "MONITOR.TENSORBOARD", False,
]  # fmt: skip
DETECT_OPTS = [
    "SOLVER.MAX_ITER", 2, "SOLVER.IMS_PER_BATCH", 2, "INPUT.MIN_SIZE_TRAIN", "(96,)",
    "INPUT.MAX_SIZE_TRAIN", 128, "INPUT.MIN_SIZE_TEST", 96, "INPUT.MAX_SIZE_TEST", 128,
]  # fmt: skip


def toy_spec(tmp: Path, name: str = "toy", **top) -> Path:
    """Write the spec to ``tmp/<name>.yaml``; ``top`` replaces top-level keys. The data are made
    by the study's own data stages under ``tmp/data``."""
    data = tmp / "data"
    spec = {
        "NAME": name,
        "OUTPUT_DIR": str(tmp / "study"),
        "BASELINE": "baseline",
        "DETECTRON2_DATASETS": str(data),
        "THREADS": 1,
        "DATA": [f"--root {data} --what voc", f"--root {data} --what imagenet"],
        "ARMS": {
            "mcl": {
                "PRETRAIN": str(ROOT / "pretrain/configs/toy.yaml"),
                "OPTS": ["DATA.ROOT", str(data / "imagenet"), *PRETRAIN_OPTS],
            },
            "baseline": {
                "PRETRAIN": str(ROOT / "pretrain/configs/toy_baseline.yaml"),
                "OPTS": ["DATA.ROOT", str(data / "imagenet"), *PRETRAIN_OPTS],
            },
        },
        "PROTOCOLS": {
            "voc": {
                "CONFIG": str(ROOT / "detection_configs/toy_voc_faster_rcnn_r18_fpn.yaml"),
                "OPTS": DETECT_OPTS,
                "TRIALS": 2,
            }
        },
        "CLEANUP": {"DETECTOR_WEIGHTS": True},
    }
    spec.update(top)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
