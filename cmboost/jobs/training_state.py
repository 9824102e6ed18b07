"""A trainer's whole state in one object (as EDM2 keeps one dict): its networks, optimizer, and where
used the scheduler, the gradient scaler and the CPU RNG, with the step; saved into a Job's training-state
file and restored from it. Also the flat safetensors entries a module and an optimizer become."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Mapping

import torch

from cmboost.jobs.config import as_json


@dataclasses.dataclass
class TrainingState:
    """What one trainer saves and resumes: `modules` by prefix ("model", or "net", "ema", "target"), its
    optimizer, and optionally a MultiStepLR `scheduler`, a GradScaler `scaler` (saved while enabled) and the
    CPU RNG (`rng`). `save(job, step)` and `restore(job, saved)` go through the job's state file, whose
    names are the same for the three trainers: "<prefix>.<tensor>", "optimizer.<param>.<name>", "rng.cpu"."""

    modules: Mapping[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.MultiStepLR | None = None
    scaler: torch.amp.GradScaler | None = None
    rng: bool = False

    @property
    def meta_keys(self) -> tuple[str, ...]:
        """The meta entries a state of this trainer must hold (Job.load_state refuses one without them)."""
        return ("optimizer_groups",) + (("scheduler",) if self.scheduler is not None else ())

    def save(self, job, step: int) -> None:
        tensors = {k: v for prefix, module in self.modules.items() for k, v in module_tensors(prefix, module).items()}
        optimizer, groups = optimizer_tensors(self.optimizer)
        tensors.update(optimizer)
        meta = {"optimizer_groups": groups}
        if self.scheduler is not None:
            meta["scheduler"] = scheduler_to_json(self.scheduler)
        if self.scaler is not None and self.scaler.is_enabled():
            meta["scaler"] = self.scaler.state_dict()
        if self.rng:
            tensors["rng.cpu"] = torch.get_rng_state()
        job.save_state(step, tensors, meta)

    def restore(self, job, saved: tuple[int, dict, dict]) -> int:
        """Loads `saved` (what job.load_state(self.meta_keys) returned) into the trainer; returns its step."""
        step, tensors, meta = saved
        for prefix, module in self.modules.items():
            job.restore(prefix, module, tensors)
        job.restore_optimizer(self.optimizer, tensors, meta["optimizer_groups"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(scheduler_from_json(meta["scheduler"]))
        if self.scaler is not None and self.scaler.is_enabled() and "scaler" in meta:
            self.scaler.load_state_dict(meta["scaler"])
        if self.rng:
            torch.set_rng_state(tensors["rng.cpu"])
        return step

    def load(self, job) -> int | None:
        """The step of the job's saved state, restored; None when it has none yet."""
        saved = job.load_state(self.meta_keys)
        return None if saved is None else self.restore(job, saved)


def scheduler_to_json(scheduler) -> dict:
    """MultiStepLR's state as JSON (its milestones are a Counter with integer keys)."""
    state = scheduler.state_dict()
    return dict(state, milestones=[[int(k), int(v)] for k, v in state["milestones"].items()])


def scheduler_from_json(state: dict) -> dict:
    return dict(state, milestones=Counter({int(k): int(v) for k, v in state["milestones"]}))


def optimizer_tensors(optimizer) -> tuple[dict, list]:
    """An optimizer's state as tensors ("optimizer.<param>.<name>") and its parameter groups as JSON,
    for `Job.save_state`."""
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
