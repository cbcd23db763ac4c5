"""The small pretraining run the engine, pipeline and reliability tests share."""

import json
from pathlib import Path


def toy_opts(root, out, **extra: str) -> list[str]:
    """KEY VALUE overrides of a 2-epoch run on a 24-image ImageFolder at ``root`` (3 iterations
    per epoch, 6 in all) into ``out``; ``extra`` (dotted keys via ``**{...}``) overrides them."""
    o = {
        "DATA.ROOT": str(root),
        "DATA.IMAGE_SIZE": "32",
        "OUTPUT_DIR": str(out),
        "MODEL.QUEUE_SIZE": "16",
        "MODEL.DIM": "16",
        "SOLVER.IMS_PER_BATCH": "8",
        "SOLVER.EPOCHS": "2",
        "MONITOR.EVAL_PERIOD": "0",
        "MONITOR.TENSORBOARD": "False",
        "MONITOR.PROGRESS": "False",
    }
    o.update(extra)
    return [x for kv in o.items() for x in kv]


def train_losses(out) -> list[tuple[int, float]]:
    """(iteration, loss) of every train line of ``out/log.jsonl``."""
    lines = [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]
    return [(r["iteration"], r["loss"]) for r in lines if r["type"] == "train"]
