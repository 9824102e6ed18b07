"""The four training objectives of the paper's ablation (docs/method.md §3), as small callables.

Each objective is called on the logits of attacked real images (labels y) and attacked generated
images (the labels they were generated for) and returns (loss, terms): the scalar to minimise
and a dict of its detached terms. `forward` runs ONE forward pass on real and generated images
concatenated. Each objective also names:
- the per-example values its attacks maximise (`real_attack`, `gen_attack`): the real images
  are pushed towards "fake", the generated ones towards "real";
- the realness reading it trains (`realness_kind`, also in REALNESS_KIND), for boosting.

  ce      CE(f(x_adv), y)                                 robust classifier (BIGRoC); realness = p(y|x)
  bce     BCE(f_y(x_adv), 1) + BCE(f_yh(xh_adv), 0)        sigmoid(f_y) discriminator
  ce+bce  bce + CE(f(x_adv), y) + CE(f(xh_adv), yh)        the released code's sum, every term training
  joint   -log p(y|x_adv) - log(1 - p(yh|xh_adv))          softmax discriminator (the paper's proposal)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cmboost.errors import UserInputError
from cmboost.jcd import log_not_prob_from_logits, log_prob_from_logits

# Which realness reading each objective trains: boost with the matching one. "ce" trains a
# classifier only (no discriminator); its natural score is the classifier's p(y|x).
REALNESS_KIND = {"ce": "softmax", "bce": "sigmoid", "ce+bce": "sigmoid", "joint": "softmax"}
TRAINS_DISCRIMINATOR = {"ce": False, "bce": True, "ce+bce": True, "joint": True}


# ----------------------------------------------------------------------------- per-example terms

def class_logit(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B] f_y(x) in fp32."""
    return logits.float().gather(1, y.view(-1, 1)).squeeze(1)


def ce_per_example(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B] CE(f(x), y) = -log p(y|x)."""
    return -log_prob_from_logits(logits, y)


def bce_real_per_example(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B] BCE(f_y(x), 1) = -log sigmoid(f_y) = softplus(-f_y)."""
    return F.softplus(-class_logit(logits, y))


def bce_fake_per_example(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B] BCE(f_y(x), 0) = -log(1 - sigmoid(f_y)) = softplus(f_y)."""
    return F.softplus(class_logit(logits, y))


def joint_fake_per_example(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[B] -log(1 - p(y|x)), via logsumexp over the other classes (stable as p -> 1)."""
    return -log_not_prob_from_logits(logits, y)


# ----------------------------------------------------------------------------- objectives

class TrainingObjective:
    """Base: subclasses set name/uses_generated and define the attack values and `loss_terms`."""

    name = ""
    uses_generated = True

    @property
    def realness_kind(self) -> str:
        return REALNESS_KIND[self.name]

    def real_attack(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[B] what PGD maximises on real images (towards "fake")."""
        raise NotImplementedError

    def gen_attack(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[B] what PGD maximises on generated images (towards "real")."""
        raise NotImplementedError

    def loss_terms(self, logits_real: torch.Tensor, y_real: torch.Tensor, logits_gen: torch.Tensor | None,
                   y_gen: torch.Tensor | None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, logits_real: torch.Tensor, y_real: torch.Tensor, logits_gen: torch.Tensor | None = None,
                 y_gen: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.uses_generated and (logits_gen is None or y_gen is None):
            raise ValueError(f"objective {self.name} needs generated logits and labels")
        terms = self.loss_terms(logits_real, y_real, logits_gen, y_gen)
        loss = sum(terms.values())
        return loss, {k: v.detach() for k, v in terms.items()}

    def forward(self, model: torch.nn.Module, x_real: torch.Tensor, y_real: torch.Tensor,
                x_gen: torch.Tensor | None, y_gen: torch.Tensor | None):
        """One forward on cat(real, generated). Returns (loss, terms, logits_real, logits_gen)."""
        if self.uses_generated and x_gen is not None:
            logits = model(torch.cat([x_real, x_gen.to(x_real.dtype)]))
            logits_real, logits_gen = logits[: x_real.shape[0]], logits[x_real.shape[0]:]
        else:
            logits_real, logits_gen = model(x_real), None
        loss, terms = self(logits_real, y_real, logits_gen if self.uses_generated else None,
                           y_gen if self.uses_generated else None)
        return loss, terms, logits_real, logits_gen

    def __repr__(self) -> str:
        return f"objective({self.name!r})"


class CEObjective(TrainingObjective):
    """Robust classifier: CE on attacked real images; the attack maximises the CE (standard AT)."""

    name = "ce"
    uses_generated = False

    def real_attack(self, logits, y):
        return ce_per_example(logits, y)

    def gen_attack(self, logits, y):
        raise ValueError("objective ce does not use generated images")

    def loss_terms(self, logits_real, y_real, logits_gen, y_gen):
        return {"ce_real": ce_per_example(logits_real, y_real).mean()}


class BCEObjective(TrainingObjective):
    """sigmoid(f_y) as the discriminator; attacks as released: maximise BCE(f_y, 1) on real and
    BCE(f_y, 0) on generated."""

    name = "bce"

    def real_attack(self, logits, y):
        return bce_real_per_example(logits, y)

    def gen_attack(self, logits, y):
        return bce_fake_per_example(logits, y)

    def loss_terms(self, logits_real, y_real, logits_gen, y_gen):
        return {"bce_real": bce_real_per_example(logits_real, y_real).mean(),
                "bce_gen": bce_fake_per_example(logits_gen, y_gen).mean()}


class CEPlusBCEObjective(BCEObjective):
    """The released loss, all four terms training (the release detached three of them)."""

    name = "ce+bce"

    def loss_terms(self, logits_real, y_real, logits_gen, y_gen):
        terms = super().loss_terms(logits_real, y_real, logits_gen, y_gen)
        terms["ce_real"] = ce_per_example(logits_real, y_real).mean()
        terms["ce_gen"] = ce_per_example(logits_gen, y_gen).mean()
        return terms


class JointObjective(TrainingObjective):
    """p(y|x) as the discriminator: -log p(y|x_adv) on real + -log(1 - p(yh|xh_adv)) on generated.
    Attacks maximise each side's term: real pushed to low p(y|x), generated to high p(yh|xh)."""

    name = "joint"

    def real_attack(self, logits, y):
        return ce_per_example(logits, y)

    def gen_attack(self, logits, y):
        return joint_fake_per_example(logits, y)

    def loss_terms(self, logits_real, y_real, logits_gen, y_gen):
        return {"joint_real": ce_per_example(logits_real, y_real).mean(),
                "joint_gen": joint_fake_per_example(logits_gen, y_gen).mean()}


TRAINING_OBJECTIVES = {"ce": CEObjective, "bce": BCEObjective, "ce+bce": CEPlusBCEObjective, "joint": JointObjective}


def get_objective(name: str) -> TrainingObjective:
    """The objective called `name` ("ce", "bce", "ce+bce" or "joint")."""
    if name not in TRAINING_OBJECTIVES:
        raise UserInputError(f"--objective {name!r}: choose one of {', '.join(TRAINING_OBJECTIVES)}")
    return TRAINING_OBJECTIVES[name]()
