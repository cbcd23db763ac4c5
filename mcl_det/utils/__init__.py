"""Small helpers shared by every stage: user-facing errors, atomic I/O and safe loading, RNG
states, output folders (lock, resume policy) and clean stops on preemption. The commands' run
layer on top of them (exit codes, launcher) is ``mcl_det.cli.run``."""
