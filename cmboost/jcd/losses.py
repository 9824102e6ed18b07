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

Any objective may add the gradient-alignment term (`GradientAlignment`): on the clean real batch,
weight * mean(1 - cos(grad_x log p(y|x), s(x, sigma, y))), where s is a class-conditional diffusion
teacher's score, the perceptually-aligned-gradients loss of Ganz, Kawar & Elad (ICML 2023).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from cmboost.errors import UserInputError
from cmboost.jcd.model import log_not_prob_from_logits, log_prob_from_logits

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
                x_gen: torch.Tensor | None, y_gen: torch.Tensor | None, aligned: "AlignmentBatch | None" = None):
        """One forward on cat(real, generated[, the alignment's clean images]): one pass, so that DDP
        sees one forward per backward. Returns (loss, terms, logits_real, logits_gen)."""
        parts = [x_real]
        if self.uses_generated and x_gen is not None:
            parts.append(x_gen.to(x_real.dtype))
        if aligned is not None:
            parts.append(aligned.images.to(x_real.dtype))
        logits = model(torch.cat(parts)) if len(parts) > 1 else model(x_real)
        logits_real, rest = logits[: len(x_real)], logits[len(x_real):]
        logits_gen = None
        if self.uses_generated and x_gen is not None:
            logits_gen, rest = rest[: len(x_gen)], rest[len(x_gen):]
        loss, terms = self(logits_real, y_real, logits_gen if self.uses_generated else None,
                           y_gen if self.uses_generated else None)
        if aligned is not None:
            term = aligned.loss(rest)
            loss = loss + term
            terms["align"] = term.detach()
            terms["align_cos"] = aligned.last_cosine
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


# ----------------------------------------------------------------------------- gradient alignment

@dataclasses.dataclass
class AlignmentBatch:
    """One iteration's alignment inputs: clean images that require grad, their labels, the teacher's
    score at them (the target direction) and the term's weight."""

    images: torch.Tensor
    labels: torch.Tensor
    target: torch.Tensor
    weight: float
    last_cosine: torch.Tensor | None = None

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """weight * mean(1 - cos(grad_x log p(y|x), target)), differentiable in the network's weights
        (create_graph): the input gradient is itself trained. Rows where either vector is zero count as
        cosine 0."""
        (grad,) = torch.autograd.grad(log_prob_from_logits(logits, self.labels).sum(), self.images,
                                      create_graph=True)
        cos = F.cosine_similarity(grad.flatten(1).float(), self.target.flatten(1).float(), dim=1, eps=1e-12)
        self.last_cosine = cos.detach().mean()
        return self.weight * (1.0 - cos).mean()


class GradientAlignment:
    """The alignment term's fixed parts: a score s(x, sigma, y) in the network's [0, 1] pixels (for
    example cmboost.diagnostic.measures.DenoiserScore of an EDM teacher), the noise level and the weight."""

    def __init__(self, score, sigma: float, weight: float):
        self.score, self.sigma, self.weight = score, float(sigma), float(weight)

    def batch(self, images: torch.Tensor, labels: torch.Tensor) -> AlignmentBatch:
        with torch.no_grad():
            target = self.score(images, self.sigma, labels).float()
        return AlignmentBatch(images.detach().clone().requires_grad_(True), labels, target, self.weight)


TRAINING_OBJECTIVES = {"ce": CEObjective, "bce": BCEObjective, "ce+bce": CEPlusBCEObjective, "joint": JointObjective}


def get_objective(name: str) -> TrainingObjective:
    """The objective called `name` ("ce", "bce", "ce+bce" or "joint")."""
    if name not in TRAINING_OBJECTIVES:
        raise UserInputError(f"--objective {name!r}: choose one of {', '.join(TRAINING_OBJECTIVES)}")
    return TRAINING_OBJECTIVES[name]()
