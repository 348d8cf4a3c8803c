"""Recipe `regularizers:` through the engine (every trainer gets them the same way)."""

import pytest
import torch

from rlprox.cli import main
from rlprox.engine import Engine
from rlprox.prox.optim import ProxOptimizer
from rlprox.recipe import RecipeError, load_recipe


def with_regs(tiny_recipe, regs, **sections):
    data = tiny_recipe(**sections)
    data["regularizers"] = regs
    return data


def test_prox_regularizer_zeroes_groups_and_logs_sparsity(tiny_recipe):
    recipe = load_recipe(
        with_regs(tiny_recipe, [{"type": "group_l2", "params": "policy.actor.0.weight", "lam": 50.0}])
    )
    engine = Engine(recipe)
    assert isinstance(engine.optimizer.optimizer, ProxOptimizer)
    stats = engine.fit()
    engine.close()
    w = engine.algo.policy.actor[0].weight
    assert w.abs().sum(1).eq(0).float().mean() > 0.5
    assert stats["sparsity/policy.actor.0.weight"] == pytest.approx(float(w.abs().sum(1).eq(0).float().mean()))
    assert "penalty/0.group_l2" in stats


def test_penalty_mode_adds_to_loss_and_lam_schedule_sets_lambda(tiny_recipe):
    regs = [
        {
            "type": "l1",
            "params": "policy.critic.*.weight",
            "mode": "penalty",
            "lam_schedule": {"type": "linear", "start": 0.0, "end": 1.0, "steps": 2},
        }
    ]
    engine = Engine(load_recipe(with_regs(tiny_recipe, regs)))
    assert not isinstance(engine.optimizer.optimizer, ProxOptimizer) or not engine.optimizer.optimizer.regularizers
    stats = engine.fit()
    engine.close()
    assert stats["penalty/0.l1.lam"] == 1.0  # iteration index 2 of a 2-step ramp
    assert stats["loss/total"] > stats["loss/policy"] + 0.5 * stats["loss/value"] + 1.0  # the L1 term is in the loss


@pytest.mark.parametrize(
    "regs,message",
    [
        (
            [{"type": "wgsef", "params": "policy.nothing.*", "k": 2, "lam": 1.0}],
            "regularizers[0].params: 'policy.nothing.*' matches no parameter",
        ),
        (
            [{"type": "wgsf", "params": "policy.*", "lam": 1.0}],
            "regularizers[0]: regularizer field 'type': unknown regularizer type 'wgsf' (did you mean 'wgsef'?)",
        ),
        ([{"type": "l1", "params": "policy.*", "lam": -1.0}], "regularizers[0]: regularizer field 'lam' must be >= 0"),
        ([{"type": "l1", "lam": 1.0}], "regularizers[0].params: a glob"),
        (
            [{"type": "l1", "params": "policy.*", "lam": 1.0, "lam_schedule": {"type": "linear"}}],
            "regularizers[0].lam: give either lam or lam_schedule",
        ),
        ([{"type": "l1", "params": "policy.*", "mode": "both"}], "regularizers[0].mode: must be prox or penalty"),
        (
            [{"type": "l1", "params": "policy.*", "lam": 1.0, "mode": "penalty", "prox_lr": 0.01}],
            "regularizers[0].prox_lr: only a prox-mode regularizer has a prox step",
        ),
        ([{"type": "l1", "params": "policy.*", "lam": 1.0, "prox_lr": -0.1}], "regularizers[0].prox_lr: must be >= 0"),
        (
            [{"type": "l1", "params": "policy.*", "lam": 1.0, "prox_lr": {"type": "lineer"}}],
            "regularizers[0].prox_lr: ",
        ),
    ],
)
def test_bad_regularizer_specs_one_line(tmp_path, tiny_recipe, capsys, regs, message):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(with_regs(tiny_recipe, regs)))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("recipe error: ") and message in err, err


def test_regularized_resume_equals_uninterrupted(tmp_path, tiny_recipe):
    regs = [
        {"type": "wgsef", "params": "policy.actor.[02].weight", "k": 16, "lam": 0.3},
        {
            "type": "l1",
            "params": "policy.critic.0.weight",
            "mode": "penalty",
            "lam_schedule": {"type": "linear", "start": 0.0, "end": 0.01, "steps": 4},
        },
    ]
    full = Engine(load_recipe(with_regs(tiny_recipe, regs, run={"iterations": 4, "name": "full"})))
    full.fit()
    Engine(load_recipe(with_regs(tiny_recipe, regs, run={"iterations": 2, "name": "cut", "save_every": 1}))).fit()
    resumed = Engine(load_recipe(with_regs(tiny_recipe, regs, run={"iterations": 4, "name": "cut", "resume": "auto"})))
    resumed.fit()
    for a, b in zip(full.algo.policy.parameters(), resumed.algo.policy.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(RecipeError):
        load_recipe(with_regs(tiny_recipe, [{"params": "x"}]))


def test_yaml_number_strings_and_bad_shapes(tmp_path, tiny_recipe, capsys):
    import yaml

    path = tmp_path / "r.yaml"
    path.write_text(
        "regularizers:\n  - {type: wgsef, params: 'policy.actor.0.weight', k: 8, lam: 1e-3}\n"
        + yaml.safe_dump(tiny_recipe(run={"iterations": 1}))
    )
    assert main(["train", str(path)]) == 0  # `1e-3` reads as a string in YAML 1.1
    path.write_text(
        yaml.safe_dump(
            with_regs(
                tiny_recipe,
                [{"type": "group_l2", "params": "policy.actor.0.weight", "lam": 1.0, "weights": [1.0, 2.0, 3.0]}],
                run={"name": "w"},
            )
        )
    )
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("recipe error: regularizers[0]: cannot apply to policy.actor.0.weight (64, 4): ")
        and "3 weights for 64 groups" in err
    ), err
