"""diffjax: a JAX/Flax training stack for diffusion models."""

__version__ = "0.1.0"
