"""MCL cohort pretraining (Yang et al., AAAI 2022): self-supervised on MoCo v2, or supervised.

Modules: ``config`` (yacs defaults), ``losses`` (the four MCL terms, pure functions), ``models``
(cohorts of torchvision ResNets with heads, queues, banks), ``data`` (ImageFolder, aug+, samplers),
``distributed`` (single-process-safe DDP helpers, shuffle-BN), ``engine`` (train loop),
``checkpoint`` (the ``mcl_det.pretrain/v1`` file), ``monitor`` (kNN, logs), ``linear_eval``.
Entry point: ``pretrain/main.py`` -> ``engine.launch_training``.
"""
