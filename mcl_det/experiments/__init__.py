"""Complete experiments built from the toolkit's stages (each stage runs its user-facing CLI)."""

from .fashion import FashionSettings, run_fashion_experiment, tiny_settings

__all__ = ["FashionSettings", "run_fashion_experiment", "tiny_settings"]
