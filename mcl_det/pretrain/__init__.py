"""MCL cohort pretraining (Yang et al., AAAI 2022): self-supervised on MoCo v2, or supervised.

Modules: ``config`` (yacs defaults and setup; ``choices``: the names its enum keys accept),
``losses`` (the four MCL terms, pure functions, and the config's weights of them), ``losses_sup``
(their supervised bank / in-batch forms), ``method`` (``CohortMethod``: what the train loop needs
from a method), ``models`` (one cohort class per training method: torchvision ResNets with heads,
queues, banks), ``data`` (ImageFolder, aug+, samplers, the input pipeline), ``augment`` (the
batched device-side aug+), ``distributed`` (single-process-safe DDP helpers, shuffle-BN),
``engine`` (train loop), ``checkpoint`` (the ``mcl_det.pretrain/v1`` file), ``evaluation`` (the
monitor's data and per-member metrics), ``monitor`` (kNN, logs), ``linear_eval``.
Entry point: ``pretrain/main.py`` -> ``mcl_det.cli.pretrain`` (``launch_training``).
"""
