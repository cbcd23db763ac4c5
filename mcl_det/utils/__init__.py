"""Small helpers shared by every stage: user-facing errors, CLI wrapping, atomic I/O and safe
loading, RNG states, output folders (lock, resume policy) and clean stops on preemption."""
