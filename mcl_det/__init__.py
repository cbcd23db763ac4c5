"""mcl_det: Mutual Contrastive Learning (MCL) cohort pretraining and detectron2 detection transfer.

Importing ``mcl_det`` registers everything our detection configs name (ROI heads) with detectron2's
registries, so a config never depends on which script loads it. Without detectron2 installed the
pretraining side still imports.
"""

import importlib.util as _ilu
import warnings as _warnings

__version__ = "0.1.0"

# detectron2 0.6 scripts a few helpers with torch.jit.script at import time, which torch >= 2.10
# reports as deprecated on every run; the warning is not actionable for our users.
_warnings.filterwarnings(
    "ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning
)

if _ilu.find_spec("detectron2") is not None:
    from . import detection  # noqa: E402,F401  (registers the ROI heads)
