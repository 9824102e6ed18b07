"""The feature-extractor interface every network implements, the shared input-size check, and the
builder of timm's networks (an optional dependency, the `cmboost[judges]` extra)."""

from __future__ import annotations

import torch

from cmboost.errors import UserInputError


class FeatureExtractor:
    """Common interface; cmboost.metrics.features' docstring says what __call__ returns."""

    name: str = ""            # what the user asked for ("inception", "fmnist", a path)
    identity: str = ""        # what the features are: stored in references and checked against them
    pool_dim: int = 0
    num_classes: int = 0
    spatial_dim: int | None = None
    spatial_reason: str | None = None
    logits_reason: str | None = None
    device: torch.device = torch.device("cpu")
    precision: str = "fp32"

    def check_images(self, shape: tuple[int, ...], source: str) -> None:
        raise NotImplementedError

    def padded_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """CxHxW `shape` after the zero padding the network gives its input first: images of two shapes
        that pad alike are the same data to it. Most networks pad nothing."""
        return tuple(int(v) for v in shape)

    def __call__(self, images_u8: torch.Tensor) -> dict[str, torch.Tensor | None]:
        raise NotImplementedError


def check_resizable(shape: tuple[int, ...], source: str, net_name: str, size: int) -> None:
    """For networks that take grey (repeated to RGB) or RGB images of any size, resized to `size`."""
    c, h, w = (int(v) for v in shape)
    if c not in (1, 3):
        raise UserInputError(f"{source}: images have {c} channels; {net_name} takes 1 (repeated) or 3")
    if h < 2 or w < 2:
        raise UserInputError(f"{source}: images are {h}x{w}, too small to resize to {size}")


def create_timm_model(name: str, **kwargs) -> torch.nn.Module:
    """timm.create_model(name, pretrained=False, **kwargs) in eval mode: weights come from local files."""
    try:
        import timm
    except ImportError:
        raise UserInputError(f"{name} is a network of timm, which is not installed: "
                             "pip install 'cmboost[judges]'") from None
    return timm.create_model(name, pretrained=False, **kwargs).eval()
