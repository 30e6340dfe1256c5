"""Diffusion models (DDPM, DDIM): filled by the diffusion issue."""
