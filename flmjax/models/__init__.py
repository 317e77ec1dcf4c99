"""Denoiser networks."""
