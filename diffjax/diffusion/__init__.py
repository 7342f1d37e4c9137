"""Diffusion math (no Flax): schedules, parametrizations, losses, samplers, guidance."""

from diffjax.diffusion import guidance, losses, parametrizations, samplers, schedules

__all__ = ["guidance", "losses", "parametrizations", "samplers", "schedules"]
