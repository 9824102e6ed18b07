"""PGD: the ball and the bounds, ascent, untouched parameters and modes, early stop, determinism."""

import pytest
import torch

from cmboost.jcd.attacks import FROM_OBJECTIVE, PGD
from cmboost.errors import UserInputError
from cmboost.jcd.model import build_joint_model
from cmboost.runtime import sample_generators


class Linear(torch.nn.Module):
    """objective(x) = <w, x> per example: its gradient is w everywhere, so steps are hand-checkable."""

    def __init__(self, shape=(1, 4, 4), seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(shape, generator=g))

    def forward(self, x):
        return (x * self.w).flatten(1).sum(1)


def l2(t):
    return t.flatten(1).norm(dim=1)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_joint_model("resnet_small", 10, 1, 16).eval()


@pytest.mark.parametrize("norm,eps", [("l2", 0.7), ("linf", 0.05)])
def test_stays_in_ball_and_bounds_and_raises_objective(model, norm, eps):
    torch.manual_seed(1)
    x = torch.rand(6, 1, 16, 16)
    y = torch.arange(6)
    objective = lambda z: torch.log_softmax(model(z), 1).gather(1, y[:, None]).squeeze(1)  # noqa: E731
    attack = PGD(norm, eps=eps, step_size=eps / 2, steps=5, random_start=True)
    x_adv = attack(model, objective, x)
    delta = x_adv - x
    if norm == "l2":
        assert (l2(delta) <= eps + 1e-5).all()
    else:
        assert delta.abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        assert (objective(x_adv) > objective(x)).all()
    assert torch.equal(attack.last_steps, torch.full((6,), 5))
    assert not x_adv.requires_grad


def test_l2_and_linf_steps_match_hand_computation():
    model = Linear()
    x = torch.full((2, 1, 4, 4), 0.5)
    w = model.w.detach()
    out = PGD("l2", eps=10.0, step_size=0.1, steps=1)(model, model, x)
    assert torch.allclose(out, x + 0.1 * w / w.norm(), atol=1e-6)  # x + step * g / ||g||_2
    out = PGD("linf", eps=10.0, step_size=0.01, steps=1)(model, model, x)
    assert torch.allclose(out, x + 0.01 * w.sign(), atol=1e-6)
    # projection: 3 steps of 0.2 along w but eps 0.3 -> ends on the sphere, along w
    out = PGD("l2", eps=0.3, step_size=0.2, steps=3)(model, model, x)
    assert torch.allclose(out, x + 0.3 * w / w.norm(), atol=1e-5)
    # minimise by negating
    out = PGD("l2", eps=10.0, step_size=0.1, steps=1)(model, lambda z: -model(z), x)
    assert torch.allclose(out, x - 0.1 * w / w.norm(), atol=1e-6)


def test_clips_to_bounds_before_projecting():
    model = Linear()
    x = torch.full((1, 1, 4, 4), 0.99)
    out = PGD("linf", eps=0.5, step_size=0.3, steps=1, bounds=(0.0, 1.0))(model, model, x)
    w = model.w.detach()
    expected = torch.where(w > 0, torch.ones_like(x), x - 0.3)
    assert torch.allclose(out, expected, atol=1e-6)


def test_parameters_modes_and_flags_untouched(model):
    x = torch.rand(3, 1, 16, 16)
    y = torch.tensor([1, 2, 3])
    params = list(model.parameters())
    marker = [torch.full_like(p, 7.0) for p in params]
    for p, m in zip(params, marker):
        p.grad = m.clone()
    params[0].requires_grad_(False)  # the caller's choice, restored as it was
    before = [p.detach().clone() for p in params]
    for mode in (True, False):
        model.train(mode)
        PGD("l2", eps=1.0, step_size=0.5, steps=2, random_start=True)(
            model, lambda z: model.realness(z, y, "sigmoid"), x)
        assert model.training is mode
        assert all(m.training is mode for m in model.modules())
    assert params[0].requires_grad is False and all(p.requires_grad for p in params[1:])
    for p, m, b in zip(params, marker, before):
        assert torch.equal(p.grad, m)
        assert torch.equal(p.detach(), b)
    # and a parameter without .grad still has none
    for p in params:
        p.grad = None
    PGD("l2", eps=1.0, step_size=0.5, steps=1)(model, lambda z: model.realness(z, y, "sigmoid"), x)
    assert all(p.grad is None for p in params)


def test_flags_restored_when_objective_fails(model):
    def broken(z):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        PGD(steps=1)(model, broken, torch.rand(2, 1, 16, 16))
    assert all(p.requires_grad for p in model.parameters())


def test_early_stopped_examples_are_frozen():
    model = Linear()
    x = torch.full((4, 1, 4, 4), 0.5)
    calls = []

    def stop(z):
        calls.append(z.clone())
        flags = torch.zeros(4, dtype=torch.bool)
        flags[0] = True                      # stopped from the start: never moves
        flags[1] = len(calls) == 2           # stopped after one step, "un-stopped" later: stays frozen
        return flags

    attack = PGD("l2", eps=10.0, step_size=0.1, steps=4)
    out = attack(model, model, x, stop=stop)
    w = model.w.detach()
    unit = w / w.norm()
    assert torch.equal(out[0], x[0])
    assert torch.allclose(out[1], x[1] + 0.1 * unit, atol=1e-6)
    assert torch.allclose(out[2], x[2] + 0.4 * unit, atol=1e-5)
    assert torch.equal(attack.last_steps, torch.tensor([0, 1, 4, 4]))
    assert len(calls) == 4  # checked before each step


def test_with_labels_stopped_rows_leave_the_batch(model):
    """With labels, objective and stop see only the rows still moving, with their own labels, and the
    result is the whole-batch attack's (each row's step depends on that row alone)."""
    torch.manual_seed(2)
    x, y = torch.rand(6, 1, 16, 16), torch.tensor([3, 1, 4, 1, 5, 9])
    threshold = [None]
    seen = []

    def score(z, labels):
        return torch.log_softmax(model(z), 1).gather(1, labels[:, None]).squeeze(1)

    def stop(z, labels):
        seen.append(labels.tolist())
        values = score(z, labels)
        if threshold[0] is None:  # stops about half the rows at once, the others later or never
            threshold[0] = values.median().item()
        return values >= threshold[0]

    attack = PGD("l2", eps=2.0, step_size=0.2, steps=6)
    compact = attack(model, score, x, stop=stop, labels=y)
    steps = attack.last_steps.clone()
    assert seen[0] == y.tolist() and len(seen[1]) < 6  # the first check sees all, later ones fewer
    assert all(set(labels) <= set(y.tolist()) for labels in seen)
    whole = PGD("l2", eps=2.0, step_size=0.2, steps=6)(
        model, lambda z: score(z, y), x, stop=lambda z: score(z, y) >= threshold[0])
    torch.testing.assert_close(compact, whole, rtol=0, atol=1e-6)
    assert 0 < int((steps == 0).sum()) < 6
    with pytest.raises(ValueError, match="labels for a batch"):
        attack(model, score, x, stop=stop, labels=y[:3])


@pytest.mark.parametrize("with_labels", [True, False])
@pytest.mark.parametrize("random_start", [False, True])
def test_stop_read_off_the_objective_equals_a_separate_stop_rule(model, with_labels, random_start):
    """stop=FROM_OBJECTIVE: the done flags come with the objective's own forward pass; every row stops
    where a separate rule would stop it, with the same steps and images."""
    torch.manual_seed(3)
    x, y = torch.rand(8, 1, 16, 16), torch.arange(8) % 10
    gens = sample_generators(5, range(8)) if random_start else None

    def score(z, labels):
        return torch.log_softmax(model(z), 1).gather(1, labels[:, None]).squeeze(1)

    threshold = score(x, y).median().item() + 0.3  # some rows start done, others get there or never
    settings = dict(norm="l2", eps=2.0, step_size=0.25, steps=8, random_start=random_start)
    separate, shared = PGD(**settings), PGD(**settings)
    if with_labels:
        a = separate(model, score, x, stop=lambda z, l: score(z, l) >= threshold, labels=y, generators=gens)
        b = shared(model, lambda z, l: (score(z, l), score(z, l) >= threshold), x, stop=FROM_OBJECTIVE, labels=y,
                   generators=sample_generators(5, range(8)) if random_start else None)
    else:
        a = separate(model, lambda z: score(z, y), x, stop=lambda z: score(z, y) >= threshold, generators=gens)
        b = shared(model, lambda z: (score(z, y), score(z, y) >= threshold), x, stop=FROM_OBJECTIVE,
                   generators=sample_generators(5, range(8)) if random_start else None)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert torch.equal(shared.last_steps, separate.last_steps)
    assert 0 < int((separate.last_steps < 8).sum()) < 8  # the rule stopped some rows, not all
    with pytest.raises(ValueError, match=r"\(values, done\)"):
        PGD(steps=1)(model, lambda z: score(z, y), x, stop=FROM_OBJECTIVE)
    with pytest.raises(ValueError, match="FROM_OBJECTIVE"):
        PGD(steps=1)(model, lambda z: score(z, y), x, stop="from the objective")


def test_all_stopped_ends_early():
    model = Linear()
    count = []

    def stop(z):
        count.append(1)
        return torch.ones(z.shape[0], dtype=torch.bool)

    x = torch.rand(3, 1, 4, 4)
    attack = PGD("l2", eps=1.0, step_size=0.1, steps=10, random_start=True)
    assert torch.equal(attack(model, model, x, stop=stop), x)
    assert len(count) == 1 and attack.last_steps.sum() == 0


def test_random_start_does_not_depend_on_the_batch():
    model = Linear(seed=3)
    x = torch.rand(5, 1, 4, 4)
    attack = PGD("l2", eps=0.5, step_size=0.1, steps=2, random_start=True)
    full = attack(model, model, x, generators=sample_generators(7, range(5)))
    part = attack(model, model, x[2:4], generators=sample_generators(7, [2, 3]))
    assert torch.equal(full[2:4], part)
    again = attack(model, model, x, generators=sample_generators(8, range(5)))
    assert not torch.equal(full, again)
    linf = PGD("linf", eps=0.1, step_size=0.0, steps=1, random_start=True)
    start = linf(model, model, x, generators=sample_generators(7, range(5)))
    assert 0 < (start - x).abs().max() <= 0.1 + 1e-6


def test_zero_steps_and_low_precision(model):
    x = torch.rand(2, 1, 16, 16)
    y = torch.tensor([0, 1])
    assert torch.equal(PGD(steps=0)(model, lambda z: model.realness(z, y, "sigmoid"), x), x)
    out = PGD("l2", eps=0.5, step_size=0.25, steps=2, precision="bf16", channels_last=True)(
        model, lambda z: model.log_prob(z, y), x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert (l2(out - x) <= 0.5 + 1e-5).all()


def test_bad_hyperparameters_and_objectives():
    with pytest.raises(UserInputError, match="norm"):
        PGD("l1")
    with pytest.raises(UserInputError, match="steps"):
        PGD(steps=-1)
    with pytest.raises(UserInputError, match="bounds"):
        PGD(bounds=(1.0, 0.0))
    with pytest.raises(UserInputError, match="precision"):
        PGD(precision="fp8")
    model = Linear()
    with pytest.raises(ValueError, match="one value per example"):
        PGD(steps=1)(model, lambda z: model(z).sum(), torch.rand(2, 1, 4, 4))
