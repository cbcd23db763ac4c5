"""Small helpers shared by every stage: user-facing errors, CLI wrapping, atomic I/O, config
loading, output folders (lock, resume policy) and clean stops on preemption."""
