"""A random-weight, class-conditional EDM teacher file for the tests that need a score (diagnose, train-jcd's
alignment term)."""

import torch

from cmboost.cm.checkpoint import save_model
from cmboost.cm.denoiser import EDM_PRECOND
from cmboost.cm.unet import UNetModel


def random_edm_teacher(path, num_classes: int, channels: int, size: int):
    """A small UNet with its weights moved off their initial values (a zero-initialised output layer would
    make every score the Gaussian one), saved as `train-cm --mode edm` saves a teacher; returns the path."""
    unet = dict(image_size=size, in_channels=channels, model_channels=8, out_channels=channels, num_res_blocks=1,
                attention_resolutions=[], channel_mult=[1, 2], num_classes=num_classes, num_head_channels=8,
                use_scale_shift_norm=True, resblock_updown=True)
    torch.manual_seed(0)
    net = UNetModel(**unet)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return save_model(path, net, "edm", unet, EDM_PRECOND)
