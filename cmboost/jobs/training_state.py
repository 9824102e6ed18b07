"""A training state's tensors: a module's and an optimizer's as flat safetensors entries, and back."""

from __future__ import annotations

from typing import Mapping

from cmboost.jobs.config import as_json


def optimizer_tensors(optimizer) -> tuple[dict, list]:
    """An optimizer's state as tensors ("optimizer.<param>.<name>") and its parameter groups as JSON,
    for `Job.save_state`."""
    import torch

    saved = optimizer.state_dict()
    tensors = {f"optimizer.{index}.{name}": torch.as_tensor(value)
               for index, state in saved["state"].items() for name, value in state.items()}
    groups = [{k: v for k, v in group.items() if k != "params"} for group in saved["param_groups"]]
    return tensors, as_json(groups)


def load_optimizer(optimizer, tensors: Mapping, groups: list) -> None:
    """Restores what `optimizer_tensors` saved (the optimizer moves each value to its parameter's device)."""
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    current = optimizer.state_dict()
    groups = [dict(saved, params=live["params"]) for live, saved in zip(current["param_groups"], groups)]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def module_tensors(prefix: str, module) -> dict:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def tensors_under(prefix: str, tensors: Mapping) -> dict:
    """The tensors saved under `prefix.` with the prefix removed (a module's state dict)."""
    return {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
