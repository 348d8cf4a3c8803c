"""Recurrent PPO (``ppo.lstm``): the masked-CartPole wrapper, the states the rollout
stores and their resets at episode ends, minibatches of whole env sequences that start
from the stored state, ratio 1 before any update, training, exact SIGKILL resume,
export + ``load_policy`` with an explicit state, and one-line recipe errors."""

import json

import numpy as np
import pytest
import torch
import yaml

import rlprox
from rlprox.cli import main
from rlprox.engine import Engine, build_for_eval
from rlprox.gymenv import EnvConfig, GymRollout, make_env, make_vec_env, run_episodes
from rlprox.models.recurrent import EpisodeActor, RecurrentActorCritic, flatten_state, unflatten_state
from rlprox.recipe import load_recipe
from tests.conftest import film, tiny_ppo

MASKED = "rlprox/MaskedCartPole-v1"


def lstm_recipe(tmp_path, env=None, run=None, **ppo) -> dict:
    return tiny_ppo(
        tmp_path,
        env={"num_envs": 4, **(env or {})},
        run={"iterations": 2, **(run or {})},
        ppo={"num_steps": 32, "minibatch_size": 64, "update_epochs": 2, "lstm": {"hidden_size": 16}, **ppo},
    )


CRITICS = pytest.mark.parametrize("critic", ["shared", "separate"])


def width(critic: str) -> int:
    """Columns of the stored state per layer: the LSTM's 16, twice that with a separate critic LSTM."""
    return 16 * (2 if critic == "separate" else 1)


def collected(tmp_path, **ppo):
    engine = Engine(load_recipe(lstm_recipe(tmp_path, **ppo)))
    algo = engine.algo
    return engine, algo, algo.collect()


# ----------------------------------------------------------------------------- env


def test_masked_cartpole_drops_the_velocities():
    masked, full = make_env(EnvConfig(id=MASKED)), make_env(EnvConfig(id="CartPole-v1"))
    assert masked.observation_space.shape == (2,) and masked.spec.max_episode_steps == 500
    a, _ = masked.reset(seed=5)
    b, _ = full.reset(seed=5)
    np.testing.assert_array_equal(a, b[[0, 2]])  # (cart position, pole angle)
    for action in (0, 1, 1, 0, 1):
        a, ra, *_ = masked.step(action)
        b, rb, *_ = full.step(action)
        np.testing.assert_array_equal(a, b[[0, 2]])
        assert ra == rb
    masked.close()
    full.close()


# ----------------------------------------------------------------------------- rollout and update


@CRITICS
def test_rollout_stores_the_state_each_step_started_from_reset_at_episode_starts(tmp_path, critic):
    engine, algo, batch = collected(tmp_path, lstm={"hidden_size": 16, "critic": critic})
    T, N = batch["done"].shape
    assert batch["h"].shape == batch["c"].shape == (T, N, width(critic))
    assert batch["done"][:-1].sum() > 0  # some episodes ended inside the rollout
    np.testing.assert_array_equal(batch["starts"][0], np.ones(N))  # the first observations begin episodes
    np.testing.assert_array_equal(batch["starts"][1:], batch["done"][:-1])  # after a done, a new episode
    started = batch["starts"].astype(bool)
    assert not batch["h"][started].any() and not batch["c"][started].any()  # reset to zeros
    assert batch["h"][~started].any()
    # the same LSTM re-run over the whole rollout from the stored step-0 state passes through every stored state
    model = algo.policy
    with torch.no_grad():
        h0, c0 = (unflatten_state(torch.from_numpy(batch[k][0]), model) for k in ("h", "c"))
        obs = torch.from_numpy(batch["obs"]).reshape(T * N, -1)
        starts = torch.from_numpy(batch["starts"]).reshape(-1)
        out, (hT, cT), (hs, cs) = model.unroll(obs, (h0, c0), starts, keep_states=True)
        fast, _, _ = model.unroll(obs, (h0, c0), starts)  # the update's path: one LSTM call per span
    stored_h = np.stack([flatten_state(h).numpy() for h in hs])
    np.testing.assert_allclose(stored_h, batch["h"], atol=1e-6)
    np.testing.assert_allclose(np.stack([flatten_state(c).numpy() for c in cs]), batch["c"], atol=1e-6)
    np.testing.assert_allclose(fast.numpy(), out.numpy(), atol=1e-6)
    np.testing.assert_allclose(hT.numpy(), algo.lstm_state[0].numpy(), atol=1e-6)  # carried to the next rollout
    engine.close()


@CRITICS
def test_minibatches_are_whole_env_sequences_from_the_stored_state_with_ratio_one(tmp_path, critic):
    engine, algo, batch = collected(tmp_path, lstm={"hidden_size": 16, "critic": critic})
    T, N = batch["done"].shape
    packed = algo.advantages(batch)
    col, seen = algo.columns, []
    for mb, moments in algo.minibatches(packed, 0):
        n = len(mb) // T
        assert n == 2 and moments is None  # 4 envs, 2 minibatches
        obs = col(mb, "obs").reshape(T, n, -1).numpy()
        envs = [int(np.flatnonzero((batch["obs"][:, :, :] == obs[:, i : i + 1]).all((0, 2)))[0]) for i in range(n)]
        seen += envs
        np.testing.assert_array_equal(obs, batch["obs"][:, envs])  # all T steps of these envs, time-major
        # the state the minibatch starts from is the stored state of its envs' first step
        np.testing.assert_array_equal(col(mb, "h")[:n].numpy(), batch["h"][0, envs])
        np.testing.assert_array_equal(col(mb, "c")[:n].numpy(), batch["c"][0, envs])
        with torch.no_grad():
            logp, _, values = algo.policy(
                col(mb, "obs"), col(mb, "actions"), col(mb, "h")[:n], col(mb, "c")[:n], col(mb, "starts")
            )
            _, stats = algo.loss((mb, moments))
        torch.testing.assert_close(logp, col(mb, "logp"), atol=1e-5, rtol=0)  # ratio 1 before any update
        torch.testing.assert_close(values, col(mb, "values"), atol=1e-5, rtol=0)
        assert abs(float(stats["policy/ratio_max"]) - 1.0) < 1e-4
    assert sorted(seen) == list(range(N))  # every env once per epoch
    engine.close()


def test_a_separate_critic_lstm_keeps_the_value_loss_out_of_the_actors_memory(tmp_path):
    engine, algo, batch = collected(tmp_path, lstm={"hidden_size": 16, "critic": "separate"})
    model = algo.policy
    T, N = batch["done"].shape
    obs = torch.from_numpy(batch["obs"]).reshape(T * N, -1)
    actions = torch.from_numpy(batch["actions"]).reshape(T * N, *batch["actions"].shape[2:])
    h0, c0 = (torch.from_numpy(batch[k][0]) for k in ("h", "c"))
    logp, _, values = model(obs, actions, h0, c0, torch.from_numpy(batch["starts"]).reshape(-1))
    actor_lstm, critic_lstm = list(model.lstm.parameters()), list(model.critic_lstm.parameters())
    value_grads = torch.autograd.grad(values.sum(), actor_lstm + critic_lstm, allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in value_grads[: len(actor_lstm)])  # V(s) never reads the actor's LSTM
    assert all(g is not None and g.any() for g in value_grads[len(actor_lstm) :])
    actor_grads = torch.autograd.grad(logp.sum(), critic_lstm, allow_unused=True)
    assert all(g is None or not g.any() for g in actor_grads)  # nor log π the critic's
    engine.close()


def test_a_few_iterations_train_and_evaluate_on_masked_cartpole(tmp_path):
    recipe = lstm_recipe(tmp_path, env={"id": MASKED}, run={"iterations": 3, "eval_size": 4})
    engine = Engine(load_recipe(recipe))
    assert isinstance(engine.algo.policy, RecurrentActorCritic)
    before = [p.detach().clone() for p in engine.algo.policy.parameters()]
    stats = engine.fit()
    engine.close()
    assert any(not torch.equal(a, b) for a, b in zip(before, engine.algo.policy.parameters()))
    assert np.isfinite(stats["loss/total"]) and stats["eval/count"] == 4 and stats["progress/env_steps"] == 3 * 128


def test_evaluation_resets_the_state_at_every_episode_start(tmp_path):
    engine, algo, _ = collected(tmp_path)
    actor = EpisodeActor(algo.policy.snapshot())
    calls = []

    def on_step(ended):
        calls.append(ended.copy())
        before = None if actor.state is None else actor.state[0].clone()
        actor.end_episodes(ended)
        if before is not None:
            assert not actor.state[0][:, torch.from_numpy(ended)].any()  # zeros where an episode ended
            assert torch.equal(actor.state[0][:, torch.from_numpy(~ended)], before[:, torch.from_numpy(~ended)])

    episodes = run_episodes(
        EnvConfig(id="CartPole-v1"),
        lambda obs: actor.act(obs, np.random.default_rng(0), True)[0],
        3,
        7,
        on_step=on_step,
    )
    assert len(episodes) == 3 and calls[0].all() and any(c.any() for c in calls[1:])
    engine.close()


# ----------------------------------------------------------------------------- resume and export


def test_sigkill_resume_equals_uninterrupted(tmp_path):
    from tests.crash import kill_resume_equals_uninterrupted

    iterations = 10

    def make(name):
        return lstm_recipe(
            tmp_path,
            env={"num_envs": 2},
            run={"name": name, "iterations": iterations, "save_every": 1, "keep_last": 2},
            num_steps=16,
            minibatch_size=16,
            update_epochs=1,
        )

    full = kill_resume_equals_uninterrupted(tmp_path, make, iterations)
    assert any(k.startswith("lstm.") or ".lstm." in k for k in full)


@CRITICS
def test_export_acts_with_an_explicit_state_as_the_trainer(tmp_path, critic):
    recipe = load_recipe(lstm_recipe(tmp_path, run={"iterations": 1}, lstm={"hidden_size": 16, "critic": critic}))
    engine = Engine(recipe)
    engine.fit()
    engine.close()
    out = tmp_path / "policy"
    assert main(["export", str(recipe.run_dir), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"]["lstm"] == {"hidden_size": 16, "num_layers": 1, "critic": critic}
    policy = rlprox.load_policy(out)
    assert policy.recurrent
    _, _, _, algo = build_for_eval(sorted((recipe.run_dir / "checkpoints").iterdir())[-1], cpu=True)
    snapshot = algo.policy.snapshot()

    envs = make_vec_env(EnvConfig(id="CartPole-v1"), num_envs=2)
    obs, _ = envs.reset(seed=11)
    state = policy.initial_state(2)
    assert state[0].shape == (1, 2, width(critic)) and not state[0].any()
    ref = snapshot.initial_state(2)
    ref_one = policy.initial_state(1)
    rng = np.random.default_rng(0)
    for _ in range(12):
        actions, state = policy.act(obs, state=state)  # raw observations, the state carried explicitly
        greedy, _, _, ref = snapshot.step(obs.astype(np.float32), ref, rng, deterministic=True)
        np.testing.assert_array_equal(actions, greedy)
        np.testing.assert_allclose(state[0], ref[0].numpy(), atol=1e-6)
        one, ref_one = policy.act(obs[0], state=ref_one)  # one observation, its own (1-row) state
        assert isinstance(one, int) and one == actions[0]
        obs, _, term, trunc, _ = envs.step(actions)
        ended = np.logical_or(term, trunc)
        state = tuple(np.where(ended[None, :, None], 0.0, s).astype(np.float32) for s in state)  # new episodes
        ref = tuple(x * torch.from_numpy(~ended).view(1, -1, 1) for x in ref)
        if ended[0]:
            ref_one = policy.initial_state(1)
    envs.close()
    with pytest.raises(ValueError, match="state must be"):
        policy.act(obs, state=policy.initial_state(3))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "env, ppo, field, words",
    [
        ({"num_envs": 3}, {"num_steps": 16, "minibatch_size": 24}, "ppo.minibatch_size", "must divide env.num_envs"),
        ({}, {"lstm": {"hidden_size": -1}}, "ppo.lstm.hidden_size", ">= 0"),
        ({}, {"lstm": {"hidden_size": 8, "num_layers": 0}}, "ppo.lstm.num_layers", ">= 1"),
        ({}, {"lstm": {"hidden_size": 8, "critic": "both"}}, "ppo.lstm.critic", "shared"),
    ],
)
def test_bad_input_is_one_line_before_any_env_step(tmp_path, capsys, monkeypatch, env, ppo, field, words):
    def no_steps(*args, **kwargs):
        raise AssertionError("an env was stepped")

    monkeypatch.setattr(GymRollout, "step", no_steps)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(lstm_recipe(tmp_path, env=env, **ppo)))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0] and words in err[0], err


def test_the_lstm_sits_on_image_and_dict_encoders(tmp_path):
    recipe = lstm_recipe(
        tmp_path, env={"id": "tests.envs_fixture:PixelsAndVector", "num_envs": 2}, num_steps=8, minibatch_size=8
    )
    engine = Engine(load_recipe(recipe))
    assert type(engine.algo.policy.trunk).__name__ == "KeyedTrunk"
    stats = engine.fit()
    engine.close()
    assert np.isfinite(stats["loss/total"])


def test_eval_video_carries_the_state_through_each_episode(tmp_path):
    """The filmed episodes replay the evaluation's seeds with the state carried and reset
    per episode: the same returns as ``rlprox eval``'s."""
    pytest.importorskip("imageio")
    pytest.importorskip("pygame", reason="CartPole renders with pygame (pip install 'rlprox[video]')")
    film(tmp_path, lstm_recipe(tmp_path, env={"id": MASKED}, run={"iterations": 2}), 3)
