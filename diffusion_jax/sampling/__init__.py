"""Reverse-time samplers (ancestral DDPM/DDIM, DPM-Solver++, EDM's Heun) and guidance."""
