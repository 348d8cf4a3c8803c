"""The engine knows nothing about gymnasium: a ~40-line bandit algorithm drives it,
registered through the trainer registry with its own recipe section."""

from dataclasses import dataclass

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from rlprox import checkpoint, objectives
from rlprox.algos import TRAINERS, TrainerSpec, register_trainer
from rlprox.engine import Engine, optimizer_step
from rlprox.recipe import load_recipe

ARM_MEANS = torch.tensor([0.1, 0.3, 0.9, 0.5])  # arm 2 is best


class Bandit:
    """REINFORCE with a leave-one-out baseline on a 4-armed Gaussian bandit.

    collect: K pulls from the softmax policy; advantages: leave-one-out; loss: −A·log π.
    """

    update_epochs = 2
    curve = ("progress/iteration", "reward/mean")

    def __init__(self, recipe, runtime, loss_terms=None):
        pulls = recipe.bandit.pulls
        self.logits = nn.Linear(1, len(ARM_MEANS), bias=False)
        nn.init.zeros_(self.logits.weight)
        self.modules = {"policy": self.logits}
        self.pulls = pulls
        self.gen = torch.Generator().manual_seed(recipe.seed)

    def _log_probs(self):
        return torch.log_softmax(self.modules["policy"].weight[:, 0], -1)

    def collect(self):
        probs = self._log_probs().exp()
        arms = torch.multinomial(probs, self.pulls, replacement=True, generator=self.gen)
        rewards = ARM_MEANS[arms] + 0.1 * torch.randn(self.pulls, generator=self.gen)
        self.last_reward = rewards.mean().item()
        return {"arms": arms, "rewards": rewards}

    def advantages(self, batch):
        batch["adv"] = objectives.leave_one_out(batch["rewards"][None])[0]
        return batch

    def loss(self, batch):
        logp = self._log_probs()[batch["arms"]]
        return -(batch["adv"] * logp).mean(), {"policy/logp": logp.mean().detach()}

    def iteration_stats(self, batch, elapsed):
        return {"reward/mean": self.last_reward}

    def state_dict(self):
        return {"gen": self.gen.get_state()}, {}

    def load_state_dict(self, tensors, state):
        self.gen.set_state(tensors["gen"])


@dataclass
class BanditConfig:
    pulls: int = 16  # arm pulls per iteration


if "bandit" not in TRAINERS:
    register_trainer(TrainerSpec(name="bandit", build=Bandit, sections={"bandit": BanditConfig}))


def bandit_recipe(tmp_path, **run):
    return load_recipe(
        {
            "algo": "bandit",
            "optim": {"name": "sgd", "lr": 0.5, "max_grad_norm": 0.0},
            "run": {
                "name": "bandit",
                "output_dir": str(tmp_path),
                "iterations": 60,
                "log_with": [],
                "progress": False,
                **run,
            },
        }
    )


def test_bandit_learns_best_arm(tmp_path):
    engine = Engine(bandit_recipe(tmp_path))
    assert engine.recipe.bandit.pulls == 16 and "env" not in engine.recipe.sections
    engine.fit()
    probs = engine.algo._log_probs().exp().detach()
    assert probs.argmax().item() == 2 and probs[2] > 0.8
    assert (tmp_path / "bandit" / "metrics.jsonl").exists()
    assert (tmp_path / "bandit" / "learning_curve.png").exists()
    assert checkpoint.find_latest(tmp_path / "bandit").name == "iter-000060"


def test_bandit_resume_equals_uninterrupted(tmp_path):
    full = Engine(bandit_recipe(tmp_path / "a", iterations=12))
    full.fit()
    first = Engine(bandit_recipe(tmp_path / "b", iterations=5))
    first.fit()
    second = Engine(bandit_recipe(tmp_path / "b", iterations=12, resume="auto"))
    second.fit()
    assert second.state.iteration == 12
    assert torch.equal(full.algo.modules["policy"].weight, second.algo.modules["policy"].weight)


@pytest.mark.parametrize("optim_name", ["sgd", "adam"])
def test_accumulation_invariance(optim_name):
    """1 minibatch of 8 == 8 accumulated minibatches of 1: same gradients, same step."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    init = nn.Linear(3, 1)

    def run(accum, chunks):
        model = nn.Linear(3, 1)
        model.load_state_dict(init.state_dict())
        acc = Accelerator(cpu=True, gradient_accumulation_steps=accum)
        opt = (
            torch.optim.SGD(model.parameters(), lr=0.1)
            if optim_name == "sgd"
            else torch.optim.Adam(model.parameters(), lr=0.1)
        )
        model, opt = acc.prepare(model, opt)
        grads = []
        original_step = opt.optimizer.step

        def spy_step(*a, **k):  # record the gradient the real step sees
            grads.append(torch.cat([p.grad.flatten().clone() for p in model.parameters()]))
            return original_step(*a, **k)

        opt.optimizer.step = spy_step
        for xb, yb in zip(x.chunk(chunks), y.chunk(chunks)):
            optimizer_step(acc, ((model(xb) - yb) ** 2).mean(), [model], opt, max_grad_norm=0.5)
        return grads, torch.cat([p.detach().flatten() for p in model.parameters()])

    g1, p1 = run(1, 1)
    g8, p8 = run(8, 8)
    assert len(g1) == len(g8) == 1  # exactly one real optimizer step each
    torch.testing.assert_close(g1[0], g8[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p1, p8, rtol=1e-5, atol=1e-6)
    assert not torch.equal(p1, torch.cat([p.flatten() for p in init.parameters()]))


def test_update_norm_is_each_steps_change_of_the_weights(tmp_path):
    """run.log_update_norm: an SGD step moves θ by lr·g, so the logged ‖Δθ‖ per step is lr × the logged grad norm
    (unclipped: max_grad_norm far above it); without the option nothing is logged."""
    recipe = bandit_recipe(tmp_path / "on", iterations=3, log_update_norm=True)
    recipe.optim.max_grad_norm = 1e9
    stats = Engine(recipe).fit()
    assert stats["optim/update_norm"] > 0
    assert stats["optim/update_norm"] == pytest.approx(0.5 * stats["loss/grad_norm"], rel=1e-5)
    assert "optim/update_norm" not in Engine(bandit_recipe(tmp_path / "off", iterations=1)).fit()


def test_optim_eps_reaches_adam(tmp_path):
    recipe = bandit_recipe(tmp_path)
    recipe.optim.name, recipe.optim.eps = "adamw", 1e-8
    assert Engine(recipe).base_optimizer.param_groups[0]["eps"] == 1e-8


def test_learning_curve_axes_name_what_they_plot(tmp_path, monkeypatch):
    import matplotlib.axes

    from rlprox.tracking import axis_label, plot_curve

    labels = {}
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xlabel", lambda ax, text, **kw: labels.update(x=text))
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel", lambda ax, text, **kw: labels.update(y=text))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"progress/images": 8, "reward/mean": 0.5}\n{"progress/images": 16, "reward/mean": 0.7}\n')
    assert plot_curve(metrics, tmp_path / "curve.png", "progress/images", "reward/mean")
    assert labels == {"x": "images", "y": "mean reward"} and (tmp_path / "curve.png").is_file()
    assert [
        axis_label(k) for k in ("progress/env_steps", "reward/episodic_return", "eval/accuracy", "loss/total")
    ] == [
        "environment steps",
        "episodic return",
        "evaluation accuracy",
        "total loss",
    ]
