"""Consistency models: the ADM UNet, the denoiser and its samplers, checkpoints, and training
(EDM teacher, consistency distillation, consistency training) for small datasets."""
