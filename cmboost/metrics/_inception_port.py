"""torch-fidelity's PyTorch port of the TF 2015-12-05 Inception-v3 graph, built without its own
file loading (which unpickles with weights_only=False and downloads when given no path).

torch-fidelity is an optional dependency (the "inception" extra): it is imported when a port is
built, and its absence is one line.
"""

from __future__ import annotations

import io

import torch

from cmboost.errors import UserInputError


def fidelity_inception() -> type:
    """torch-fidelity's Inception-v3 class, adapted (below); one line when torch-fidelity is missing, so
    callers ask for it before they fetch any weights."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as err:
        raise UserInputError(f"--features inception needs torch-fidelity ({err}): "
                             "pip install 'cmboost[inception]' (torch-fidelity 0.4)") from None

    class FidelityInception(FeatureExtractorInceptionV3):
        """The port with one change: an empty state dict leaves the (seeded) random initialisation,
        which the speed benchmark and the tests use when no weights are on disk."""

        def load_state_dict(self, state_dict, strict=True, assign=False):
            if not state_dict:
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    return FidelityInception


def build_port(port_class: type, state_dict: dict[str, torch.Tensor] | None,
               features_list: tuple[str, ...] = ("2048", "logits_unbiased")) -> torch.nn.Module:
    """The port (`port_class`, from fidelity_inception()) with `state_dict` (already loaded with
    weights_only=True), or random weights for None.

    torch-fidelity's constructor wants a file; it gets an in-memory copy written by us from plain
    tensors, so its internal torch.load never reads anything we did not produce."""
    buffer = io.BytesIO()
    torch.save(dict(state_dict or {}), buffer)
    buffer.seek(0)
    return port_class("inception-v3-compat", list(features_list), feature_extractor_weights_path=buffer)
