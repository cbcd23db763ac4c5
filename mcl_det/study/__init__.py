"""Studies: the whole MCL-vs-baseline transfer comparison as one dependency graph of the toolkit's
own commands (``tools/study.py``).

``spec`` (the YAML spec, checked like every config), ``graph`` (stages, their commands and
fingerprints), ``state`` (one record per stage), ``plan`` (what a run must do), ``local`` /
``slurm`` (the runners), ``estimate`` (GPU-hours from ``figures.json``), ``commands`` (run,
status, plan, report). It lives in the library, not beside tools/, because its SLURM jobs are
unpickled on the cluster nodes and must be importable there from the installed package.
"""
