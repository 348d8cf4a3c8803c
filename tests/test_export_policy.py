"""`rlprox export` and `rlprox.load_policy`: exported PPO and PolicyFlow policies act as
the trainer's greedy evaluation does (same actions, same seeded returns as `rlprox eval`);
VA-π's GPT exports in LlamaGen's checkpoint layout; `rlprox eval --video`."""

import json
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

import rlprox
from rlprox import checkpoint
from rlprox.cli import main
from rlprox.engine import Engine, build_for_eval
from rlprox.gymenv import ActionSpace, eval_seed
from rlprox.models import llamagen
from rlprox.recipe import load_recipe
from tests.conftest import ROOT, tiny_ppo
from tests.test_vapi import tiny_models, vapi_recipe

EPISODES = 3


def train(recipe_dict) -> tuple:
    recipe = load_recipe(recipe_dict)
    engine = Engine(recipe)
    engine.fit()
    engine.close()
    return recipe, checkpoint.find_latest(recipe.run_dir)


def pf_recipe(tmp_path) -> dict:
    return {
        "algo": "policyflow",
        "seed": 5,
        "run": {
            "name": "pf",
            "output_dir": str(tmp_path),
            "iterations": 2,
            "log_with": [],
            "progress": False,
            "plot": False,
        },
        "env": {"id": "Pendulum-v1", "num_envs": 2, "normalize_obs": True},
        "policyflow": {"num_steps": 16, "minibatch_size": 16, "update_epochs": 1, "flow_steps": 3},
        "optim": {"lr": 1e-3},
    }


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppo")
    return train(tiny_ppo(root, env={"normalize_obs": True}))


@pytest.fixture(scope="module")
def pf_run(tmp_path_factory):
    return train(pf_recipe(tmp_path_factory.mktemp("pf")))


def greedy_returns(policy, env_id: str, seeds) -> list[float]:
    """One episode per reset seed in plain gymnasium envs, stepped side by side with one
    batched ``policy.act`` per step, as the evaluation steps its envs (an env that is
    done restarts and keeps stepping: the batch keeps its shape, so the matmuls round
    exactly as there)."""
    envs = [gym.make(env_id) for _ in seeds]
    obs = np.stack([env.reset(seed=seed)[0] for env, seed in zip(envs, seeds)])
    totals, finished = [0.0] * len(envs), [False] * len(envs)
    while not all(finished):
        actions = policy.act(obs)
        for i, env in enumerate(envs):
            obs[i], reward, terminated, truncated, _ = env.step(actions[i])
            if not finished[i]:
                totals[i] += float(reward)
            if terminated or truncated:
                finished[i] = True
                obs[i] = env.reset()[0]
    return totals


def export_and_eval(run, tmp_path, capsys, *eval_flags):
    recipe, ckpt = run
    out = tmp_path / "policy"
    assert main(["export", str(recipe.run_dir), str(out)]) == 0
    assert "load_policy" in capsys.readouterr().out
    assert main(["eval", str(ckpt), "--episodes", str(EPISODES), *eval_flags]) == 0
    reported = json.loads((ckpt / "eval.json").read_text())
    return out, reported


def trainer_greedy_actions(ckpt, obs: np.ndarray) -> np.ndarray:
    """The deterministic env actions of the checkpoint's model, computed by the trainer."""
    _, _, _, algo = build_for_eval(ckpt, cpu=True)
    policy = algo._unwrapped()
    snapshot = policy.snapshot(algo.cfg.flow_steps) if algo.recipe.algo == "policyflow" else policy.snapshot()
    normalised = algo.env.obs_rms.normalize(obs, algo.env_cfg.clip_obs)
    action = snapshot.act(normalised, np.random.default_rng(0), deterministic=True)[0]
    if algo.recipe.algo == "ppo":  # the torch module agrees with its numpy snapshot
        with torch.no_grad():
            out = policy.actor(torch.from_numpy(normalised))
        torch_action = (out.argmax(-1) if policy.discrete else out).numpy()
        np.testing.assert_array_equal(torch_action, action)
    return ActionSpace.of(gym.make(algo.env_cfg.id).action_space).to_env(action)  # what run_episodes applies


def test_ppo_export_acts_as_greedy_eval(ppo_run, tmp_path, capsys):
    out, reported = export_and_eval(ppo_run, tmp_path, capsys)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "actor_critic" and config["action"] == {"type": "discrete", "n": 2}
    assert config["observation"] == {"dim": 4, "normalize": True, "clip": 10.0}
    assert config["env"]["id"] == "CartPole-v1" and "argmax" in config["deterministic_action"]
    policy = rlprox.load_policy(out)
    obs = np.random.default_rng(1).normal(size=(32, 4)).astype(np.float32)
    actions = policy.act(obs)
    assert actions.shape == (32,) and actions.dtype.kind == "i"
    np.testing.assert_array_equal(actions, trainer_greedy_actions(ppo_run[1], obs))
    assert isinstance(policy.act(obs[0]), int) and policy.act(obs[0]) == actions[0]
    seeds = [eval_seed(reported["seed"]) + i for i in range(EPISODES)]
    assert sorted(greedy_returns(policy, "CartPole-v1", seeds)) == sorted(reported["values"]["return"])


def test_policyflow_export_acts_as_greedy_eval(pf_run, tmp_path, capsys):
    out, reported = export_and_eval(pf_run, tmp_path, capsys, "--deterministic")
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "flow" and config["architecture"]["flow_steps"] == 3
    assert config["action"] == {"type": "box", "dim": 1, "low": [-2.0], "high": [2.0], "postprocess": "clip"}
    policy = rlprox.load_policy(out)
    obs = np.random.default_rng(1).normal(scale=3.0, size=(64, 3)).astype(np.float32)
    actions = policy.act(obs)
    assert actions.shape == (64, 1) and actions.dtype == np.float32
    np.testing.assert_array_equal(actions, trainer_greedy_actions(pf_run[1], obs))
    np.testing.assert_allclose(policy.act(obs[0]), actions[0], rtol=1e-5)  # one observation: (1,)
    seeds = [eval_seed(reported["seed"]) + i for i in range(EPISODES)]
    assert sorted(greedy_returns(policy, "Pendulum-v1", seeds)) == sorted(reported["values"]["return"])


def test_stochastic_actions_sample_and_respect_bounds(pf_run, tmp_path):
    assert main(["export", str(pf_run[1]), str(tmp_path / "p")]) == 0
    policy = rlprox.load_policy(tmp_path / "p")
    obs = np.zeros((256, 3), np.float32)
    sampled = policy.act(obs, deterministic=False, rng=np.random.default_rng(0))
    assert np.unique(sampled).size > 10 and sampled.min() >= -2.0 and sampled.max() <= 2.0
    with pytest.raises(ValueError, match=r"observations must be \(N, 3\)"):
        policy.act(np.zeros((2, 5), np.float32))


def test_continuous_actor_critic_round_trip_with_unbounded_dimensions(tmp_path):
    from rlprox.models.actor_critic import ActorCritic
    from rlprox.policy import action_space_config, save_policy

    torch.manual_seed(0)
    model = ActorCritic(3, 2, False, [8], "relu")
    torch.nn.init.normal_(model.actor[-1].weight)  # outputs well beyond the bound
    low, high = np.array([-0.5, -np.inf], np.float32), np.array([0.5, np.inf], np.float32)
    action = action_space_config(False, 2, low, high)
    assert action["low"] == [-0.5, None] and action["high"] == [0.5, None]
    save_policy(tmp_path, model, "actor_critic", {"hidden_sizes": [8], "activation": "relu"}, 3, action, "mean")
    policy = rlprox.load_policy(tmp_path)
    obs = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32) * 3
    with torch.no_grad():
        expected = model.actor(torch.from_numpy(obs)).numpy()  # the mean action
    got = policy.act(obs)
    np.testing.assert_allclose(got, np.clip(expected, low, high), rtol=1e-5, atol=1e-6)
    assert np.abs(got[:, 0]).max() == 0.5 and np.abs(got[:, 1]).max() > 0.5
    with pytest.raises(FileNotFoundError, match="not an exported rlprox policy"):
        rlprox.load_policy(tmp_path / "missing")


def test_load_policy_needs_no_gymnasium_or_trainer(ppo_run, tmp_path):
    out = tmp_path / "p"
    assert main(["export", str(ppo_run[1]), str(out)]) == 0
    code = (
        "import sys; sys.modules['gymnasium'] = None; sys.modules['accelerate'] = None\n"
        "import numpy as np, rlprox\n"
        f"p = rlprox.load_policy({str(out)!r})\n"
        "print(p.act(np.zeros((3, 4), np.float32)).tolist())\n"
        "print(sorted(m for m in sys.modules if m.startswith('rlprox.') and 'models' not in m))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # rlprox.spaces (action spaces, observation layouts) and rlprox.errors are numpy-only leaves
    assert len(json.loads(lines[0])) == 3 and lines[1] == "['rlprox.errors', 'rlprox.policy', 'rlprox.spaces']"


def test_export_of_a_missing_folder_is_one_line_exit_2(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and "not a checkpoint folder" in err[0]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- VA-π


@pytest.fixture(scope="module")
def vapi_run(tmp_path_factory):
    """A 2-iteration VA-π run from a tiny GPT and VQ saved in LlamaGen's layout."""
    root = tmp_path_factory.mktemp("vapi")
    gpt, vq = tiny_models()
    torch.save({"model": gpt.state_dict()}, root / "gpt.pt")
    torch.save({"model": vq.state_dict()}, root / "vq.pt")
    return (*train(vapi_recipe(root, (root, gpt, vq))), gpt)


def test_vapi_export_is_llamagen_layout_and_round_trips(vapi_run, tmp_path):
    _, ckpt, base = vapi_run
    out = tmp_path / "export"
    assert main(["export", str(ckpt), str(out)]) == 0
    _, _, _, algo = build_for_eval(ckpt, cpu=True)
    tuned = algo._gpt().eval()
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), base.state_dict().values()))

    raw = torch.load(out / "llamagen_gpt.pt", map_location="cpu", weights_only=True)
    assert list(raw) == ["model"] and all(isinstance(v, torch.Tensor) for v in raw["model"].values())
    assert set(raw["model"]) == set(base.state_dict())  # LlamaGen's parameter names, no rotary table
    back = llamagen.load_gpt(out / "llamagen_gpt.pt", tuned.config)  # the project's LlamaGen reader
    for name, value in tuned.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    from_safetensors = llamagen.Transformer.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "Transformer" and config["llamagen"]["checkpoint"] == "llamagen_gpt.pt"

    tokens = torch.randint(0, 32, (3, tuned.block_size - 1), generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([1, 7, 49])
    with torch.no_grad():
        expected, _ = tuned(tokens, classes)
        for model in (back, from_safetensors):
            torch.testing.assert_close(model(tokens, classes)[0], expected, rtol=0, atol=0)


def test_llamagen_checkpoint_writer_inverts_the_reader(tmp_path):
    for model in tiny_models(1):
        path = llamagen.save_llamagen_checkpoint(model, tmp_path / f"{type(model).__name__}.pt")
        read = llamagen.read_llamagen_state_dict(path)
        state = model.state_dict()
        assert set(read) == {k for k in state if not k.endswith(llamagen.IGNORED_KEYS)}
        assert all(torch.equal(read[k], state[k]) for k in read)


def test_eval_video_on_a_generative_trainer_is_one_line_exit_2(vapi_run, tmp_path, capsys):
    assert main(["eval", str(vapi_run[1]), "--video", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --video records env episodes; algo vapi evaluates samples"]


# ----------------------------------------------------------------------------- video


@pytest.fixture(scope="module")
def counter_run(tmp_path_factory):
    env = {"id": "tests.envs_fixture:RenderedCounter", "kwargs": {"terminate_at": 5}}
    return train(tiny_ppo(tmp_path_factory.mktemp("counter"), env=env, run={"iterations": 1}))


@pytest.mark.parametrize("fmt", ["gif", "mp4"])
@pytest.mark.parametrize("env", ["counter", "cartpole"])
def test_eval_video_writes_one_file_per_episode(request, tmp_path, capsys, monkeypatch, env, fmt):
    imageio = pytest.importorskip("imageio")
    import rlprox.video

    if env == "cartpole":
        pytest.importorskip("pygame", reason="CartPole renders with pygame (pip install 'rlprox[video]')")
    if fmt == "mp4":
        pytest.importorskip("imageio_ffmpeg")
    else:
        monkeypatch.setattr(rlprox.video, "has_ffmpeg", lambda: False)
    _, ckpt = request.getfixturevalue("ppo_run" if env == "cartpole" else "counter_run")
    videos = tmp_path / "videos"
    args = ["eval", str(ckpt), "--episodes", "3", "--video", str(videos), "--video-episodes", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    files = sorted(videos.iterdir())
    assert [f.name for f in files] == [f"episode-{i:03d}.{fmt}" for i in range(3)]
    assert all(f.stat().st_size > 0 and str(f) in out for f in files)
    reported = json.loads((ckpt / "eval.json").read_text())
    # the videos replay the evaluation's seeds: the same episodes, the same returns and lengths
    assert sorted(v["return"] for v in reported["videos"]) == sorted(reported["values"]["return"])
    frames = sorted(len(imageio.mimread(f, memtest=False)) for f in files)
    if fmt == "mp4":  # the reset frame, then one per step (GIF writers merge identical frames)
        assert [n - 1 for n in frames] == sorted(reported["values"]["length"])
    assert min(frames) > 1


def test_eval_video_without_a_renderer_is_one_line_exit_2(ppo_run, tmp_path, capsys, monkeypatch):
    pytest.importorskip("imageio")
    monkeypatch.setitem(sys.modules, "pygame", None)  # as if gymnasium's classic-control renderer were missing
    assert main(["eval", str(ppo_run[1]), "--video", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --video: ") and "rlprox[video]" in err[0]


def test_eval_video_of_an_env_without_rendering_is_one_line_exit_2(tmp_path, capsys):
    pytest.importorskip("imageio")
    _, ckpt = train(tiny_ppo(tmp_path, env={"id": "rlprox/MultiGoal-v0"}, run={"iterations": 1}))
    assert main(["eval", str(ckpt), "--episodes", "1", "--video", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --video: env rlprox/MultiGoal-v0 takes no render_mode: it cannot render frames"]
