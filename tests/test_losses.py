"""The four objectives against hand computations on tiny logits."""

import math

import pytest
import torch

from cmboost.errors import UserInputError
from cmboost.jcd.losses import TRAINING_OBJECTIVES, REALNESS_KIND, TRAINS_DISCRIMINATOR, get_objective

REAL = [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]
Y_REAL = [0, 2]
GEN = [[1.0, 3.0, 0.0], [-2.0, 0.0, 4.0]]
Y_GEN = [1, 0]


def softplus(v):
    return math.log1p(math.exp(v))


def log_softmax(row, k):
    return row[k] - math.log(sum(math.exp(v) for v in row))


def hand(name):
    """Each term written out from its definition with Python floats."""
    ce_real = sum(-log_softmax(r, y) for r, y in zip(REAL, Y_REAL)) / 2
    ce_gen = sum(-log_softmax(r, y) for r, y in zip(GEN, Y_GEN)) / 2
    bce_real = sum(-math.log(1 / (1 + math.exp(-r[y]))) for r, y in zip(REAL, Y_REAL)) / 2   # BCE(f_y, 1)
    bce_gen = sum(-math.log(1 - 1 / (1 + math.exp(-r[y]))) for r, y in zip(GEN, Y_GEN)) / 2  # BCE(f_y, 0)
    joint_gen = sum(-math.log(1 - math.exp(log_softmax(r, y))) for r, y in zip(GEN, Y_GEN)) / 2
    return {
        "ce": {"ce_real": ce_real},
        "bce": {"bce_real": bce_real, "bce_gen": bce_gen},
        "ce+bce": {"bce_real": bce_real, "bce_gen": bce_gen, "ce_real": ce_real, "ce_gen": ce_gen},
        "joint": {"joint_real": ce_real, "joint_gen": joint_gen},
    }[name]


@pytest.mark.parametrize("name", list(TRAINING_OBJECTIVES))
def test_objective_matches_hand_computation(name):
    objective = get_objective(name)
    loss, terms = objective(torch.tensor(REAL), torch.tensor(Y_REAL), torch.tensor(GEN), torch.tensor(Y_GEN))
    expected = hand(name)
    assert set(terms) == set(expected)
    for key, value in expected.items():
        assert math.isclose(float(terms[key]), value, rel_tol=1e-5), key
    assert math.isclose(float(loss), sum(expected.values()), rel_tol=1e-5)
    assert objective.realness_kind == REALNESS_KIND[name]


def test_every_term_trains():
    """The release detached three of the four ce+bce terms; here each one carries gradient."""
    objective = get_objective("ce+bce")
    real = torch.tensor(REAL, requires_grad=True)
    gen = torch.tensor(GEN, requires_grad=True)
    _, terms = objective(real, torch.tensor(Y_REAL), gen, torch.tensor(Y_GEN))
    for key in ("bce_real", "ce_real", "bce_gen", "ce_gen"):
        sub = objective.loss_terms(real, torch.tensor(Y_REAL), gen, torch.tensor(Y_GEN))[key]
        grads = torch.autograd.grad(sub, (real, gen), allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads), key
    assert all(not t.requires_grad for t in terms.values())


def test_attack_values_per_example():
    real, gen = torch.tensor(REAL), torch.tensor(GEN)
    y_real, y_gen = torch.tensor(Y_REAL), torch.tensor(Y_GEN)
    bce = get_objective("bce")
    assert torch.allclose(bce.real_attack(real, y_real), torch.tensor([softplus(-2.0), softplus(-0.0)]))
    assert torch.allclose(bce.gen_attack(gen, y_gen), torch.tensor([softplus(3.0), softplus(-2.0)]))
    joint = get_objective("joint")
    p = torch.softmax(gen, 1).gather(1, y_gen[:, None]).squeeze(1)
    assert torch.allclose(joint.gen_attack(gen, y_gen), -torch.log1p(-p), atol=1e-6)
    ce = get_objective("ce")
    assert torch.allclose(ce.real_attack(real, y_real), torch.nn.functional.cross_entropy(real, y_real, reduction="none"))
    with pytest.raises(ValueError, match="does not use generated"):
        ce.gen_attack(gen, y_gen)


def test_joint_is_stable_when_p_is_one():
    joint = get_objective("joint")
    gen = torch.tensor([[60.0, 0.0, 0.0]])  # p(0|x) = 1 - 2e-26: 1 - p rounds to 0 in float32
    loss, terms = joint(torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([0]), gen, torch.tensor([0]))
    assert torch.isfinite(loss)
    assert math.isclose(float(terms["joint_gen"]), 60.0 - math.log(2.0), rel_tol=1e-6)


def test_forward_is_one_concatenated_pass():
    calls = []

    class Model(torch.nn.Module):
        def forward(self, x):
            calls.append(x.shape[0])
            return x.flatten(1)[:, :3] * 3.0

    x_real, x_gen = torch.rand(2, 1, 2, 2), torch.rand(3, 1, 2, 2)
    y_real, y_gen = torch.tensor([0, 1]), torch.tensor([2, 2, 0])
    objective = get_objective("joint")
    loss, terms, logits_real, logits_gen = objective.forward(Model(), x_real, y_real, x_gen, y_gen)
    assert calls == [5]
    direct, _ = objective(x_real.flatten(1)[:, :3] * 3, y_real, x_gen.flatten(1)[:, :3] * 3, y_gen)
    assert torch.allclose(loss, direct)
    assert logits_real.shape == (2, 3) and logits_gen.shape == (3, 3)
    calls.clear()
    get_objective("ce").forward(Model(), x_real, y_real, x_gen, y_gen)
    assert calls == [2]  # the classifier objective ignores generated images


def test_tables_and_names():
    assert REALNESS_KIND == {"ce": "softmax", "bce": "sigmoid", "ce+bce": "sigmoid", "joint": "softmax"}
    assert TRAINS_DISCRIMINATOR["ce"] is False and TRAINS_DISCRIMINATOR["joint"] is True
    with pytest.raises(UserInputError, match="--objective 'hinge'"):
        get_objective("hinge")
    with pytest.raises(ValueError, match="needs generated"):
        get_objective("bce")(torch.tensor(REAL), torch.tensor(Y_REAL))


# ----------------------------------------------------------------------------- gradient alignment

def test_alignment_term_is_one_minus_the_cosine_and_trains_the_input_gradient():
    """The term equals weight * mean(1 - cos) of the input gradient it computes by hand, and a few Adam
    steps on it alone turn grad_x log p(y|x) of a small network toward a fixed target field."""
    from cmboost.jcd.model import log_prob_from_logits
    from cmboost.jcd.losses import GradientAlignment

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 3))
    # one direction per class (the gradients of all classes' log-probabilities, weighted by p, sum to zero,
    # so no network aligns them all with a single direction)
    directions = torch.randn(3, 1, 4, 4)
    alignment = GradientAlignment(lambda x, sigma, y: directions[y] * sigma, sigma=0.5, weight=2.0)
    x, y = torch.rand(64, 1, 4, 4), torch.randint(0, 3, (64,))

    batch = alignment.batch(x, y)
    term = batch.loss(net(batch.images))
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(log_prob_from_logits(net(xg), y).sum(), xg)
    cos = torch.nn.functional.cosine_similarity(g.flatten(1), directions[y].flatten(1), dim=1)
    torch.testing.assert_close(term, 2.0 * (1 - cos).mean())
    torch.testing.assert_close(batch.last_cosine, cos.mean())

    before = float(cos.mean())
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(100):
        batch = alignment.batch(x, y)
        optimizer.zero_grad()
        batch.loss(net(batch.images)).backward()
        optimizer.step()
    assert float(batch.last_cosine) > max(0.8, before + 0.5), (before, float(batch.last_cosine))


def test_alignment_joins_the_objective_in_one_forward():
    """With an alignment batch, forward adds the term to the loss and leaves the objective's own terms as
    they are without it; the network is called once."""
    from cmboost.jcd.losses import GradientAlignment

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    calls = []
    net.register_forward_hook(lambda *args: calls.append(1))
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    xg, yg = torch.rand(4, 1, 4, 4), torch.tensor([1, 1, 0, 2])
    objective = get_objective("joint")
    plain, plain_terms, _, _ = objective.forward(net, x, y, xg, yg)
    aligned = GradientAlignment(lambda z, s, l: torch.ones_like(z), 0.5, 1.0).batch(x, y)
    calls.clear()
    loss, terms, logits_real, logits_gen = objective.forward(net, x, y, xg, yg, aligned)
    assert len(calls) == 1
    assert set(terms) == set(plain_terms) | {"align", "align_cos"}
    for k in plain_terms:
        torch.testing.assert_close(terms[k], plain_terms[k])
    torch.testing.assert_close(loss, plain + terms["align"])
    assert logits_real.shape == logits_gen.shape == (4, 3)
