"""``run.compile``: PPO with torch.compile of the rollout's torch forward and the update's
loss (the default inductor backend, on CPU here: each test pays one compilation of tiny
models) trains as without it, and its checkpoints and exports are interchangeable with an
uncompiled run's; trainers that do not compile refuse the key in one line."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import rlprox
from rlprox.algos.ppo import minibatch_loss
from rlprox.checkpoint import find_latest
from rlprox.cli import main
from rlprox.engine import Engine
from rlprox.gymenv import EnvConfig, make_vec_env
from rlprox.models.actor_critic import SharedActorCritic, heads
from rlprox.recipe import RecipeError, load_recipe
from tests.conftest import ROOT, tiny_ppo

PIXELS = "tests.envs_fixture:BrightPixel"


def train(tmp_path, name: str, compiled: bool, iterations: int = 2, env=None, **run):
    recipe = load_recipe(
        tiny_ppo(tmp_path, env=env, run={"name": name, "iterations": iterations, "compile": compiled, **run})
    )
    engine = Engine(recipe)
    stats = engine.fit()
    engine.close()
    return engine, stats


def saved_keys(run_dir) -> dict[str, list[str]]:
    latest = find_latest(run_dir)
    return {f: sorted(load_file(latest / f)) for f in ("model.safetensors", "optimizer.safetensors")}


@pytest.mark.slow  # ~30-50 s on 2 cores: .ci/run runs it after make test
def test_compiled_update_matches_eager_and_checkpoints_are_interchangeable(tmp_path):
    eager, eager_stats = train(tmp_path, "eager", False)
    compiled, stats = train(tmp_path, "compiled", True)
    assert eager.algo.loss_fn is minibatch_loss and compiled.algo.loss_fn is not minibatch_loss
    assert compiled.algo.rollout_forward is None  # the vector MLP's rollout is its numpy twin
    # same rollout (numpy), same update up to float rounding: the same stats
    assert sorted(stats) == sorted(eager_stats)
    assert all(np.isfinite(stats[k]) for k in ("loss/total", "loss/policy", "loss/value", "policy/approx_kl"))
    assert stats["loss/total"] == pytest.approx(eager_stats["loss/total"], rel=1e-3, abs=1e-5)
    keys = saved_keys(tmp_path / "compiled")
    assert keys == saved_keys(tmp_path / "eager")
    assert not any("_orig_mod" in k for k in keys["model.safetensors"])
    assert set(compiled.algo.policy.state_dict()) == set(eager.algo.policy.state_dict())
    # a compiled run resumes uncompiled, and an uncompiled one compiled
    resumed, more = train(tmp_path, "compiled", False, iterations=3, resume="auto")
    assert resumed.state.iteration == 3 and np.isfinite(more["loss/total"])
    resumed, more = train(tmp_path, "eager", True, iterations=3, resume="auto")
    assert resumed.state.iteration == 3 and np.isfinite(more["loss/total"])


def test_compiled_cnn_policy_trains_and_exports(tmp_path):
    env = {"id": PIXELS, "num_envs": 2}
    eager, eager_stats = train(tmp_path, "eager", False, env=env)
    before = [p.detach().clone() for p in eager.algo.policy.parameters()]
    engine, stats = train(tmp_path, "compiled", True, env=env)
    policy = engine.algo.policy
    assert isinstance(policy, SharedActorCritic) and engine.algo.rollout_forward not in (None, heads)
    assert stats["progress/env_steps"] == 2 * 2 * 16 and np.isfinite(stats["loss/total"])
    assert stats["loss/total"] == pytest.approx(eager_stats["loss/total"], rel=1e-3, abs=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))  # init is seeded: it trained
    assert saved_keys(tmp_path / "compiled") == saved_keys(tmp_path / "eager")
    out = tmp_path / "policy"
    assert main(["export", str(tmp_path / "compiled"), str(out)]) == 0
    vec = make_vec_env(EnvConfig(id=PIXELS), num_envs=3)
    frames, _ = vec.reset(seed=0)
    vec.close()
    loaded = rlprox.load_policy(out)
    assert set(loaded.module.state_dict()) == set(policy.state_dict())
    greedy = policy.snapshot().act(frames.reshape(3, -1).astype(np.float32), np.random.default_rng(0), True)[0]
    np.testing.assert_array_equal(loaded.act(frames), greedy)


@pytest.mark.parametrize(
    "recipe, overrides, words",
    [
        ("policyflow/multigoal.yaml", [], "algo policyflow does not support it"),
        ("ppo/cartpole.yaml", ["run.grad_sync=fsdp"], "not supported with run.grad_sync: fsdp"),
    ],
)
def test_run_compile_is_refused_in_one_line_where_unsupported(tmp_path, capsys, recipe, overrides, words):
    args = [f"{ROOT}/recipes/{recipe}", "run.compile=true", f"run.output_dir={tmp_path}", *overrides]
    with pytest.raises(RecipeError, match=words):
        load_recipe(args[0], args[1:])
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recipe error: run.compile: ") and words in err[0], err
