"""cmboost: boost few-step generator samples with an adversarially trained joint classifier-discriminator."""

__version__ = "0.1.0"
