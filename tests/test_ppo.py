"""Tier 2: PPO for a few iterations on tiny settings."""

import json

import numpy as np
import pytest
import torch
import yaml
from accelerate import Accelerator

from rlprox import checkpoint
from rlprox.algos.ppo import PPO
from rlprox.cli import main
from rlprox.engine import Engine, make_runtime, run_evaluation
from rlprox.recipe import load_recipe
from tests.conftest import tiny_ppo


def make_ppo(recipe, train=True):
    """A PPO algorithm outside the engine (its own runtime: accelerator and streams)."""
    return PPO(recipe, make_runtime(Accelerator(cpu=True), recipe.seed, train=train))


REQUIRED = ["loss/policy", "loss/value", "policy/entropy", "policy/approx_kl", "policy/clip_frac", "perf/sps"]


def params(module):
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def test_ppo_discrete_runs_and_changes_parameters(tiny_recipe):
    engine = Engine(load_recipe(tiny_recipe()))
    before = params(engine.algo.policy)
    stats = engine.fit()
    engine.close()
    assert not torch.equal(before, params(engine.algo.policy))
    for key in REQUIRED:
        assert key in stats and np.isfinite(stats[key]), key
    assert stats["progress/env_steps"] == 3 * 2 * 16


def test_ppo_continuous_normalisation_saved_and_used_by_eval(tiny_recipe, tmp_path, capsys):
    recipe = load_recipe(
        tiny_recipe(env={"id": "Pendulum-v1", "normalize_obs": True, "normalize_reward": True}, run={"iterations": 2})
    )
    engine = Engine(recipe)
    engine.fit()
    engine.close()
    ckpt = checkpoint.find_latest(recipe.run_dir)
    saved = json.loads((ckpt / "rank-0.json").read_text())["algo"]
    assert saved["obs_rms"]["count"] > 60  # 2 iterations x 2 envs x 16 steps (+ epsilon)
    mean, var, _ = engine.algo.env.obs_rms.stats()
    np.testing.assert_allclose(saved["obs_rms"]["mean"], mean)
    # rlprox eval rebuilds from the checkpoint and uses the saved statistics
    assert main(["eval", str(ckpt), "--episodes", "2"]) == 0
    out = capsys.readouterr().out
    assert "return" in out
    result = json.loads((ckpt / "eval.json").read_text())
    assert len(result["values"]["return"]) == 2 and result["unit"] == "episodes"
    fresh = make_ppo(recipe, train=False)
    checkpoint.load_for_eval(ckpt, fresh.modules, fresh.load_state_dict)
    np.testing.assert_allclose(fresh.env.obs_rms.stats()[0], mean)
    stats, values, _, _ = run_evaluation(fresh, Accelerator(cpu=True), 2, recipe.seed)
    assert stats["eval/return"] == result["eval/return"] and values["return"] == result["values"]["return"]


def test_truncation_bootstraps_from_final_observation(tiny_recipe):
    recipe = load_recipe(
        tiny_recipe(
            env={"id": "tests.envs_fixture:Counter", "max_episode_steps": 3, "num_envs": 1},
            ppo={"num_steps": 8, "minibatch_size": 8},
        )
    )
    algo = make_ppo(recipe)
    batch = algo.collect()
    snap = algo.policy.snapshot()
    v = lambda x: float(snap.value(np.array([[x]], np.float32))[0])  # noqa: E731
    done = batch["done"][:, 0]
    assert list(np.flatnonzero(done)) == [2, 5]
    assert batch["terminated"].sum() == 0
    # truncated at obs [3]: bootstrap V([3]), not V(reset obs [0])
    assert abs(v(3.0) - v(0.0)) > 1e-3
    np.testing.assert_allclose(batch["next_values"][[2, 5], 0], [v(3.0), v(3.0)], rtol=1e-5)
    np.testing.assert_allclose(batch["next_values"][0, 0], v(1.0), rtol=1e-5)
    assert batch["obs"][3, 0, 0] == 0.0  # the step after truncation starts from the reset obs
    algo.close()


def test_termination_does_not_bootstrap(tiny_recipe):
    recipe = load_recipe(
        tiny_recipe(
            env={"id": "tests.envs_fixture:Counter", "kwargs": {"terminate_at": 2}, "num_envs": 1},
            ppo={"num_steps": 4, "minibatch_size": 4, "gamma": 0.5, "gae_lambda": 1.0},
        )
    )
    algo = make_ppo(recipe)
    batch = algo.collect()
    assert list(np.flatnonzero(batch["terminated"][:, 0])) == [1, 3]
    packed = algo.advantages(batch)
    ret = packed[:, -1].numpy()
    np.testing.assert_allclose(ret[[1, 3]], [1.0, 1.0], rtol=1e-6)  # last reward only, no bootstrap
    np.testing.assert_allclose(ret[[0, 2]], [1.5, 1.5], rtol=1e-6)
    algo.close()


def test_custom_env_wrapper_and_async(tiny_recipe):
    recipe = load_recipe(
        tiny_recipe(
            env={
                "id": "tests.envs_fixture:Counter",
                "wrappers": ["tests.envs_fixture:ScaleReward"],
                "vectorization": "async",
                "max_episode_steps": 5,
            },
            run={"iterations": 1},
        )
    )
    engine = Engine(recipe)
    stats = engine.fit()
    engine.close()
    assert stats["reward/episodic_return"] == 10.0  # 5 steps x reward 2


def test_env_state_restored_by_replay(tiny_recipe):
    """A fresh algorithm loading the state continues with identical experience."""
    recipe = load_recipe(tiny_recipe(env={"normalize_obs": True}))
    a = make_ppo(recipe)
    a.collect()
    tensors, state = a.state_dict()
    state = json.loads(json.dumps(state))  # what a checkpoint stores
    b = make_ppo(recipe)
    b.policy.load_state_dict(a.policy.state_dict())
    b.load_state_dict(tensors, state)
    b.rng.bit_generator.state = a.rng.bit_generator.state  # the engine's per-rank stream (saved by the engine)
    batch_a, batch_b = a.collect(), b.collect()
    for key in batch_a:
        np.testing.assert_array_equal(batch_a[key], batch_b[key], err_msg=key)
    a.close()
    b.close()


def test_numpy_rollout_policy_matches_torch_module():
    """The fused numpy snapshot gives the torch module's log-probs and values."""
    from rlprox.models.actor_critic import ActorCritic

    rng = np.random.default_rng(0)
    for discrete in (True, False):
        torch.manual_seed(0)
        model = ActorCritic(5, 3, discrete, hidden_sizes=[16, 8])
        obs = rng.normal(size=(7, 5)).astype(np.float32)
        action, logp, value = model.snapshot().act(obs, rng)
        t_logp, _, t_value = model(torch.from_numpy(obs), torch.from_numpy(np.asarray(action, np.float32)))
        np.testing.assert_allclose(logp, t_logp.detach().numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(value, t_value.detach().numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(model.snapshot().value(obs), t_value.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_tiny_run_reproduces_its_recorded_numbers(tiny_recipe):
    """The final stats of a tiny CartPole run, recorded before PPO and PolicyFlow moved
    their env side into ``rlprox.onpolicy.OnPolicyEnv``: a refactor keeps them; a change
    of the rollout, the RNG streams' order or the loss moves them (then re-record)."""
    engine = Engine(load_recipe(tiny_recipe(run={"eval_size": 3})))
    stats = engine.fit()
    engine.close()
    recorded = {
        "loss/total": 8.232301712036133,
        "policy/approx_kl": 5.6595403293613344e-05,
        "value/explained_variance": 0.042282283306121826,
        "reward/episodic_return": 22.0,
        "eval/return": 72.0,
    }
    assert {key: stats[key] for key in recorded} == pytest.approx(recorded, rel=1e-5)


def test_stop_after_runs_the_first_iterations_of_the_full_schedule_and_resume_finishes_it(tmp_path, capsys):
    def recipe(folder, **run):
        return load_recipe(
            tiny_ppo(tmp_path / folder, run={"iterations": 4, **run}, optim={"lr": 1e-3, "lr_schedule": "linear"})
        )

    full = Engine(recipe("full"))
    full.fit()
    full.close()
    part = Engine(recipe("part", stop_after=2))
    part.fit()
    part.close()
    rows = [json.loads(x) for x in (tmp_path / "part" / "t" / "metrics.jsonl").read_text().splitlines()]
    full_rows = [json.loads(x) for x in (tmp_path / "full" / "t" / "metrics.jsonl").read_text().splitlines()]
    assert [r["progress/iteration"] for r in rows] == [1, 2]
    assert [r["optim/lr"] for r in rows] == [r["optim/lr"] for r in full_rows[:2]]  # annealed over 4, not 2
    assert checkpoint.find_latest(tmp_path / "part" / "t").name == "iter-000002"
    rest = Engine(recipe("part", resume="auto"))
    rest.fit()
    rest.close()
    for a, b in zip(full.algo.policy.parameters(), rest.algo.policy.parameters()):
        assert torch.equal(a, b)  # the truncated run resumed is the uninterrupted one
    capsys.readouterr()
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_ppo(tmp_path, run={"iterations": 4, "stop_after": 5})))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "recipe error: run.stop_after: must be <= run.iterations = 4 (got 5)", err
