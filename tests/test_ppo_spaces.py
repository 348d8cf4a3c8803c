"""PPO on image, Dict, MultiDiscrete, MultiBinary and any-shape Box spaces: the encoder
is picked by the observation space, the CNN's init and pixel scaling, training, exact
resume, export + ``load_policy`` on raw observations, a user encoder from
docs/usage.md, and one-line recipe errors for spaces or encoders that do not fit."""

import json
import math
import re

import numpy as np
import pytest
import torch
import yaml

import rlprox
from rlprox.cli import main
from rlprox.engine import Engine, build_for_eval
from rlprox.gymenv import EnvConfig, GymRollout, make_env, make_vec_env
from rlprox.models.actor_critic import ActorCritic, SharedActorCritic, TorchPolicy
from rlprox.models.encoders import KeyedTrunk, NatureCNN, UserTrunk, VectorEncoder, build_actor_critic
from rlprox.recipe import load_recipe
from rlprox.spaces import ActionSpace, flatten_batch, observation_layout
from tests.conftest import ROOT, tiny_ppo

PIXELS = "tests.envs_fixture:BrightPixel"
DICT = "tests.envs_fixture:PixelsAndVector"
PROBE = "tests.envs_fixture:SpaceProbe"


def recipe_dict(tmp_path, env: dict, **sections) -> dict:
    return tiny_ppo(tmp_path, env={"num_envs": 2, **env}, **{"run": {"iterations": 2}, **sections})


def fit(recipe: dict):
    engine = Engine(load_recipe(recipe))
    before = [p.detach().clone() for p in engine.algo.policy.parameters()]
    stats = engine.fit()
    engine.close()
    changed = any(not torch.equal(a, b) for a, b in zip(before, engine.algo.policy.parameters()))
    return engine, stats, changed


def spaces_of(env_id: str, **kwargs):
    env = make_env(EnvConfig(id=env_id, kwargs=kwargs))
    env.close()
    return env.observation_space, env.action_space


def model_for(env_id: str, **kwargs):
    obs_space, action_space = spaces_of(env_id, **kwargs)
    return build_actor_critic(observation_layout(obs_space), ActionSpace.of(action_space))


# ----------------------------------------------------------------------------- models


def test_encoder_is_picked_by_the_observation_space():
    assert isinstance(model_for("CartPole-v1"), ActorCritic)  # vector Box: today's separate MLPs
    assert isinstance(model_for(PROBE, action="multibinary"), ActorCritic)
    cnn = model_for(PIXELS)
    assert isinstance(cnn, SharedActorCritic) and isinstance(cnn.trunk, KeyedTrunk)
    assert [type(e) for e in cnn.trunk.encoders] == [NatureCNN] and cnn.trunk.encoders[0].pixels == "HWC"
    both = model_for(DICT)
    assert [type(e) for e in both.trunk.encoders] == [NatureCNN, VectorEncoder]
    assert both.trunk.encoders[0].pixels == "CHW" and both.trunk.out_features == 512 + 64


def test_nature_cnn_init_and_pixel_scaling():
    model = model_for(PIXELS)
    cnn = model.trunk.encoders[0]
    convs = [m for m in cnn.conv if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (32, (8, 8), (4, 4)),
        (64, (4, 4), (2, 2)),
        (64, (3, 3), (1, 1)),
    ]
    assert cnn.linear.out_features == 512

    def gram(w):  # W Wᵀ (or Wᵀ W when W is tall): gain² I for an orthogonal init
        w = w.detach().reshape(len(w), -1)
        return w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w

    for layer, gain in [*((c, math.sqrt(2)) for c in convs), (cnn.linear, math.sqrt(2)), (model.actor, 0.01)]:
        g = gram(layer.weight)
        torch.testing.assert_close(g, gain**2 * torch.eye(len(g)), atol=1e-4 * max(gain**2, 1e-2), rtol=1e-4)
        assert not layer.bias.any()
    assert float(model.critic.weight.detach().norm()) == pytest.approx(1.0, rel=1e-5)
    # the model takes raw uint8 values, channels last, and scales them by 1/255 itself
    frame = torch.randint(0, 256, (3, 36, 36, 1)).float()
    by_hand = torch.relu(cnn.linear(cnn.conv(frame.permute(0, 3, 1, 2) / 255.0)))
    torch.testing.assert_close(model.trunk(frame.reshape(3, -1)), by_hand)


@pytest.mark.parametrize("action", ["multidiscrete", "multibinary", "box2d"])
@pytest.mark.parametrize("env_id", [PROBE, DICT])
def test_sampled_log_probs_match_the_update(env_id, action):
    """The rollout's numpy sampling and the update's torch log π agree for every action
    kind, on the numpy MLP copy and on the torch trunk policy."""
    torch.manual_seed(0)
    _, action_space = spaces_of(PROBE, action=action)
    space, layout = ActionSpace.of(action_space), observation_layout(spaces_of(env_id)[0])
    model = build_actor_critic(layout, space)
    rng = np.random.default_rng(0)
    obs = rng.integers(0, 255, (5, sum(int(np.prod(e["shape"])) for e in layout))).astype(np.float32)
    snapshot = model.snapshot()
    assert isinstance(snapshot, TorchPolicy) == (env_id == DICT)
    action_, logp, value = snapshot.act(obs, rng)
    t_logp, entropy, t_value = model(
        torch.from_numpy(obs), torch.from_numpy(action_.reshape(5, -1).astype(np.float32))
    )
    np.testing.assert_allclose(logp, t_logp.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(value, t_value.detach().numpy(), rtol=1e-4, atol=1e-5)
    assert entropy.shape == (5,) and torch.isfinite(entropy).all()
    env_action = space.to_env(action_)
    assert all(action_space.contains(a) for a in env_action)


# ----------------------------------------------------------------------------- training


def test_cnn_policy_trains(tmp_path):
    engine, stats, changed = fit(recipe_dict(tmp_path, {"id": PIXELS}))
    assert changed and isinstance(engine.algo.policy, SharedActorCritic)
    assert np.isfinite(stats["loss/total"]) and stats["progress/env_steps"] == 2 * 2 * 16


def test_dict_observation_trains(tmp_path):
    engine, stats, changed = fit(recipe_dict(tmp_path, {"id": DICT}))
    assert changed and [type(e) for e in engine.algo.policy.trunk.encoders] == [NatureCNN, VectorEncoder]
    assert np.isfinite(stats["loss/total"])


@pytest.mark.parametrize("action", ["multidiscrete", "multibinary", "box2d"])
def test_action_spaces_train_and_evaluate(tmp_path, action):
    _, stats, changed = fit(recipe_dict(tmp_path, {"id": PROBE, "kwargs": {"action": action}}, run={"eval_size": 2}))
    assert changed and np.isfinite(stats["loss/total"]) and np.isfinite(stats["eval/return"])


def test_regularizer_glob_over_the_trunk_resolves(tmp_path):
    regs = [{"type": "l1", "params": "policy.trunk.*linear.weight", "lam": 1.0e-3}]
    recipe = recipe_dict(tmp_path, {"id": PIXELS}, run={"iterations": 1})
    recipe["regularizers"] = regs
    engine, stats, _ = fit(recipe)
    assert "sparsity/actor_layer0_zero_neurons" in engine.algo.model_stats()


def test_cnn_resume_equals_uninterrupted(tmp_path):
    from tests.crash import kill_resume_equals_uninterrupted

    iterations = 10

    def make(name):
        return recipe_dict(
            tmp_path,
            {"id": PIXELS},
            run={"name": name, "iterations": iterations, "save_every": 1, "keep_last": 2},
            ppo={"num_steps": 8, "minibatch_size": 8, "update_epochs": 1},
        )

    full = kill_resume_equals_uninterrupted(tmp_path, make, iterations)
    assert any("trunk.encoders.0.conv" in k for k in full)


# ----------------------------------------------------------------------------- export


def export(tmp_path, env: dict, **sections):
    recipe = load_recipe(recipe_dict(tmp_path, env, run={"iterations": 1}, **sections))
    engine = Engine(recipe)
    engine.fit()
    engine.close()
    out = tmp_path / "policy"
    assert main(["export", str(recipe.run_dir), str(out)]) == 0
    return recipe, out


def assert_acts_as_the_trainer(recipe, out, env_id: str, kwargs=None):
    """load_policy(out).act on raw env observations (a batch and a single one) gives the
    trainer's greedy env actions."""
    policy = rlprox.load_policy(out)
    env = make_vec_env(EnvConfig(id=env_id, kwargs=kwargs or {}), num_envs=3)
    raw, _ = env.reset(seed=0)
    env.close()
    actions = policy.act(raw)
    _, _, _, algo = build_for_eval(sorted((recipe.run_dir / "checkpoints").iterdir())[-1], cpu=True)
    flat = flatten_batch(algo.env.layout, raw, 3)
    greedy = algo.env.space.to_env(algo.policy.snapshot().act(flat, np.random.default_rng(0), deterministic=True)[0])
    np.testing.assert_array_equal(actions, greedy)
    one = raw[0] if not isinstance(raw, dict) else {k: v[0] for k, v in raw.items()}
    # one observation: the same action (a batch of one may round the matmuls differently)
    np.testing.assert_allclose(np.asarray(policy.act(one)), np.asarray(actions[0]), rtol=1e-5, atol=1e-6)
    return json.loads((out / "config.json").read_text())


def test_cnn_export_acts_on_raw_frames(tmp_path):
    recipe, out = export(tmp_path, {"id": PIXELS})
    config = assert_acts_as_the_trainer(recipe, out, PIXELS)
    assert config["architecture"]["encoder"] == "auto" and "÷ 255" in config["architecture"]["preprocessing"]
    assert config["observation"]["layout"] == [{"key": None, "shape": [36, 36, 1], "pixels": "HWC"}]
    assert config["observation"]["normalize"] is False


def test_dict_export_acts_on_raw_observations(tmp_path):
    recipe, out = export(tmp_path, {"id": DICT})
    config = assert_acts_as_the_trainer(recipe, out, DICT)
    assert [e["key"] for e in config["observation"]["layout"]] == ["image", "state"]


def test_box2d_export_gives_shaped_actions(tmp_path):
    recipe, out = export(tmp_path, {"id": PROBE, "kwargs": {"action": "box2d"}})
    config = assert_acts_as_the_trainer(recipe, out, PROBE, {"action": "box2d"})
    assert config["action"]["shape"] == [2, 2]
    assert rlprox.load_policy(out).act(np.zeros((5, 4), np.float32)).shape == (5, 2, 2)


def test_user_encoder_from_the_docs(tmp_path, monkeypatch):
    usage = open(f"{ROOT}/docs/usage.md").read()
    code = re.search(r"<!-- test: user-encoder -->\s*\n```python\n(?P<code>.*?)^```", usage, re.S | re.M)
    (tmp_path / "docenc.py").write_text(code["code"])
    monkeypatch.syspath_prepend(str(tmp_path))
    ppo = {"encoder": "docenc:TinyEncoder", "encoder_kwargs": {"width": 32}}
    recipe, out = export(tmp_path, {"id": PIXELS}, ppo=ppo)
    engine_policy = rlprox.load_policy(out).module
    assert isinstance(engine_policy.trunk, UserTrunk) and type(engine_policy.trunk.encoder).__name__ == "TinyEncoder"
    assert engine_policy.trunk.out_features == 32
    assert_acts_as_the_trainer(recipe, out, PIXELS)


# ----------------------------------------------------------------------------- bad input


BAD = [
    ({"id": "CartPole-v1"}, {"encoder": "nature_cnn"}, "ppo.encoder", "nature_cnn needs uint8 image observations"),
    ({"id": PIXELS, "kwargs": {"size": 20}}, {}, "ppo.encoder", "at least 36×36"),
    ({"id": PIXELS, "normalize_obs": True}, {}, "env.normalize_obs", "image observations"),
    ({"id": DICT}, {"encoder": "mlp"}, "ppo.encoder", "mlp takes a Box observation"),
    ({"id": PIXELS}, {"encoder": "nature-cnn"}, "ppo.encoder", "did you mean 'nature_cnn'"),
    ({"id": PIXELS}, {"encoder": "tests.envs_fixture:Counter"}, "ppo.encoder", "tests.envs_fixture:Counter"),
    ({"id": PROBE, "kwargs": {"observation": "text"}}, {}, "env.id", "Text observations are not supported"),
    ({"id": PROBE, "kwargs": {"observation": "graph"}}, {}, "env.id", "Graph observations are not supported"),
    ({"id": PROBE, "kwargs": {"action": "tuple"}}, {}, "env.id", "Tuple actions are not supported"),
]


@pytest.mark.parametrize("env, ppo, field, words", BAD, ids=[b[3].split()[0] + "-" + b[2] for b in BAD])
def test_bad_input_is_one_line_before_any_env_step(tmp_path, capsys, monkeypatch, env, ppo, field, words):
    def no_steps(*args, **kwargs):
        raise AssertionError("an env was stepped")

    monkeypatch.setattr(GymRollout, "step", no_steps)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(tmp_path, env, ppo=ppo)))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0] and words in err[0], err
