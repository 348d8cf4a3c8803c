"""Atari: the standard preprocessing through gymnasium + ale-py, the training-only
transforms (a lost life ends the episode, rewards become their sign) in the rollout,
exact resume on ALE (the emulator's own RNG restored with each replayed episode), the export's record of the
preprocessing, the envpool backend next to gymnasium's (where they agree, and the
resume it cannot make exact), and one-line errors for what cannot run."""

import json
import sys

import numpy as np
import pytest
import yaml

from rlprox.cli import main
from rlprox.gymenv import AtariOptions, EnvConfig, GymRollout, make_env, make_vec_env
from rlprox.spaces import observation_layout
from tests.conftest import ROOT, film, tiny_ppo

ale_py = pytest.importorskip("ale_py")
pytest.importorskip("cv2")

SMALL = {"screen_size": 36, "frame_stack": 2}  # the Nature CNN's smallest input: fast tests


def atari_env(game="Pong", **atari) -> dict:
    return {"id": f"ALE/{game}-v5", "num_envs": 2, "preprocessing": "atari", "atari": {**SMALL, **atari}}


def test_preprocessed_frames_are_stacked_grey_squares():
    env = make_env(EnvConfig(id="ALE/Breakout-v5", preprocessing="atari"))
    obs, info = env.reset(seed=0)
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8 and info["lives"] == 5
    assert observation_layout(env.observation_space)[0]["pixels"] == "CHW"
    assert env.unwrapped.ale.getFloat("repeat_action_probability") == 0.0  # AtariOptions' default, not v5's 0.25
    env.close()


def test_step_limit_counts_agent_steps():
    env = make_vec_env(EnvConfig(id="ALE/Pong-v5", num_envs=1, preprocessing="atari", max_episode_steps=5))
    env.reset(seed=0)
    ends = [bool(env.step(np.zeros(1, np.int64))[3][0]) for _ in range(5)]
    env.close()
    assert ends == [False] * 4 + [True]


def test_lost_life_ends_training_episodes_and_rewards_are_signs():
    """LivesGame scores 5 per step and loses a life every 3 steps: training sees ends at
    each lost life and rewards of 1; the episode statistics count the full game, unclipped."""
    cfg = EnvConfig(id="tests.envs_fixture:LivesGame", num_envs=2, preprocessing="atari")
    rollout = GymRollout(cfg, seed=0, rank=0, world=1, gamma=0.99)
    rollout.begin_iteration()
    steps = [rollout.step(np.zeros(2, np.int64)) for _ in range(10)]
    rollout.close()
    ends = [t + 1 for t, (_, term, done, _, _) in enumerate(steps) if term[0] and done[0]]
    assert ends == [3, 6, 9]
    assert all((reward == 1.0).all() for reward, *_ in steps)
    assert rollout.finished == [(45.0, 9), (45.0, 9)]

    off = EnvConfig(
        id=cfg.id, num_envs=2, preprocessing="atari", atari=AtariOptions(episodic_life=False, clip_reward=False)
    )
    rollout = GymRollout(off, seed=0, rank=0, world=1, gamma=0.99)
    steps = [rollout.step(np.zeros(2, np.int64)) for _ in range(4)]
    rollout.close()
    assert not any(term.any() for _, term, *_ in steps[:3]) and steps[0][0][0] == 5.0


@pytest.mark.slow  # ~30-50 s on 2 cores: .ci/run runs it after make test
def test_atari_resume_equals_uninterrupted(tmp_path):
    """Episodes of 12 steps end inside the run, so resets without a seed (the emulator's
    state and generator recorded and restored), no-op starts and sticky actions are all replayed."""
    from tests.crash import kill_resume_equals_uninterrupted

    iterations = 7

    def make(name):
        env = {**atari_env(repeat_action_probability=0.25), "max_episode_steps": 12}
        return tiny_ppo(
            tmp_path,
            env=env,
            run={"name": name, "iterations": iterations, "save_every": 1, "keep_last": 2},
            ppo={"num_steps": 8, "minibatch_size": 8, "update_epochs": 1},
        )

    kill_resume_equals_uninterrupted(tmp_path, make, iterations)


def test_export_records_the_preprocessing(tmp_path):
    recipe = tiny_ppo(tmp_path, env=atari_env(), run={"iterations": 1})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    assert main(["export", str(tmp_path / "t"), str(tmp_path / "policy")]) == 0
    config = json.loads((tmp_path / "policy" / "config.json").read_text())
    assert config["env"]["preprocessing"] == "atari"
    assert config["env"]["atari"]["screen_size"] == 36 and config["env"]["atari"]["frame_stack"] == 2
    assert config["observation"]["layout"][0]["shape"] == [2, 36, 36]


@pytest.mark.parametrize("recipe", ["breakout", "pong"])
def test_recipes_build_and_train_one_short_iteration(tmp_path, recipe):
    overrides = [
        "run.iterations=1",
        f"run.output_dir={tmp_path}",
        "run.log_with=[]",
        "run.progress=false",
        "run.plot=false",
        "run.eval_size=0",
        "env.num_envs=2",
        "ppo.num_steps=8",
        "ppo.minibatch_size=8",
        "ppo.update_epochs=1",
    ]
    assert main(["train", f"{ROOT}/recipes/ppo/{recipe}.yaml", *overrides]) == 0


# ----------------------------------------------------------------------------- envpool


def test_envpool_agrees_with_gymnasium_where_it_can():
    """Same spaces, the same first frame of Breakout, and the same episode boundaries
    with the next episode's first frame returned at the end (SAME_STEP autoreset). The
    frames after the first differ: envpool bundles its own ALE build."""
    pytest.importorskip("envpool")
    runs = {}
    for backend in ("gymnasium", "envpool"):
        cfg = EnvConfig(
            id="ALE/Breakout-v5",
            num_envs=2,
            backend=backend,
            preprocessing="atari",
            atari=AtariOptions(noop_max=0),
            max_episode_steps=4,
        )
        envs = make_vec_env(cfg)
        first, _ = envs.reset(seed=0)
        steps = [envs.step(np.array([1, 0])) for _ in range(5)]
        runs[backend] = (envs.single_observation_space, envs.single_action_space, first, steps)
        envs.close()
    (gym_obs, gym_act, gym_first, gym_steps), (pool_obs, pool_act, pool_first, pool_steps) = runs.values()
    assert gym_obs == pool_obs and gym_act == pool_act
    np.testing.assert_array_equal(gym_first, pool_first)
    for (g_obs, _, g_term, g_trunc, g_info), (p_obs, _, p_term, p_trunc, p_info) in zip(gym_steps, pool_steps):
        np.testing.assert_array_equal(g_term, p_term)
        np.testing.assert_array_equal(g_trunc, p_trunc)
        if p_trunc.any():
            assert (p_obs == pool_first).all() and all(f.shape == (4, 84, 84) for f in p_info["final_obs"])
    assert [bool(s[3][0]) for s in pool_steps] == [False, False, False, True, False]


def test_envpool_resume_starts_fresh_episodes_and_says_so(tmp_path, capfd):
    pytest.importorskip("envpool")
    recipe = tiny_ppo(tmp_path, env={**atari_env(), "backend": "envpool"}, run={"iterations": 2, "save_every": 1})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    recipe["run"]["iterations"] = 3
    path.write_text(yaml.safe_dump(recipe))
    capfd.readouterr()
    assert main(["train", str(path), "--resume"]) == 0
    err = [line for line in capfd.readouterr().err.splitlines() if "fresh resets" in line]
    assert len(err) == 1 and err[0].startswith("rlprox: env.backend envpool")
    rows = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["progress/env_steps"] == 3 * 2 * 16


# ----------------------------------------------------------------------------- bad input


def hide_module(monkeypatch, name):
    monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError


BAD = [
    ({"id": "CartPole-v1", "preprocessing": "atari"}, None, "env.preprocessing", "needs an ALE/ id"),
    ({**atari_env(), "atari": {"frame_skip": 0}}, None, "env.atari.frame_skip", "must be >= 1"),
    ({**atari_env(), "backend": "envpool", "id": "ALE/Brekout-v5"}, None, "env.id", "did you mean 'Breakout-v5'"),
    ({"id": "ALE/Pong-v5", "backend": "envpool"}, None, "env.preprocessing", "always preprocessed"),
    ({**atari_env(), "backend": "envpool", "wrappers": ["x:Y"]}, None, "env.wrappers", "do not apply"),
    ({**atari_env(), "backend": "envpool"}, "envpool", "env.backend", "rlprox[envpool]"),
    (atari_env(), "ale_py", "env.id", "rlprox[atari]"),
]


@pytest.mark.parametrize("env, hidden, field, words", BAD, ids=[f"{b[2]}-{b[3].split()[0]}" for b in BAD])
def test_bad_input_is_one_line(tmp_path, capsys, monkeypatch, env, hidden, field, words):
    if hidden is None and env.get("backend") == "envpool":
        pytest.importorskip("envpool")
    if hidden is not None:
        hide_module(monkeypatch, hidden)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_ppo(tmp_path, env=env)))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0] and words in err[0], err


def test_eval_video_films_the_full_game_frames(tmp_path):
    imageio = pytest.importorskip("imageio")
    film(tmp_path, tiny_ppo(tmp_path, env={**atari_env(), "max_episode_steps": 10}, run={"iterations": 1}), 2)
    frame = imageio.mimread(sorted((tmp_path / "v").iterdir())[0], memtest=False)[0]
    assert frame.shape[:2] == (210, 160)  # the game as rendered, not the 36×36 observation
