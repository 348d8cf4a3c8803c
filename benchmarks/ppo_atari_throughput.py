"""PPO from pixels, throughput on Breakout: rlprox vs Stable-Baselines3 ``PPO("CnnPolicy")`` vs a
CleanRL-structured loop, and rlprox on envpool vs on gymnasium's vector env.

    python benchmarks/ppo_atari_throughput.py                # 5 rounds × 4 arms × 3 iterations
    python benchmarks/ppo_atari_throughput.py --quick        # smoke: 1 round, 1 iteration, --out needed to save
    python benchmarks/ppo_atari_throughput.py --rounds 5 --iterations 3 --game Pong
    python benchmarks/ppo_atari_throughput.py --profile      # where each arm's time goes (torch profiler)

Every arm runs ``recipes/ppo/breakout.yaml``'s shape: 8 envs × 128 steps, 4 minibatches of 256, 4 epochs,
the Nature CNN on 4 stacked 84×84 grey frames, lr 2.5e-4, clip 0.1, entropy 0.01, ALE v5 with frame skip
4 done by the preprocessing, no sticky actions, episodic life and reward sign for training. Steps are agent
(env) steps; frames = 4 × steps. One torch thread, one process, CPU.

Arms (each run a FRESH subprocess, the script re-invoking itself with ``--worker``; arms alternated, the
order reversed every other round, so each round's runs share the machine's load):

    rlprox          ``Engine(recipe).fit()`` on gymnasium's SyncVectorEnv
    rlprox-envpool  the same with ``env.backend: envpool``
    sb3             ``PPO("CnnPolicy")`` on SB3's ``make_atari_env`` + ``VecFrameStack(4)`` (DummyVecEnv),
                    the same hyperparameters; ``learn()`` timed
    cleanrl         a loop written here in the structure of CleanRL's ``ppo_atari.py`` (gymnasium
                    SyncVectorEnv of ``AtariPreprocessing`` + frame stack, preallocated torch storage, the
                    GAE loop, shuffled minibatches), the same network and hyperparameters

The table: env steps/s per arm (mean ± sd over rounds), the paired per-round ratios rlprox / other with a
Student-t 95% interval (exploratory below 5 rounds), and where the time goes: the share of each
iteration spent collecting (rlprox's ``perf/collect_fraction``, the CleanRL loop's own split) next to
the update's floor, the Nature CNN forward + backward over one iteration's 4 × 1024 samples alone.
Writes benchmarks/results/ppo_atari_throughput.md (not with --quick unless --out is given).

``--profile`` runs each arm once (``--iterations``, default 2) under ``torch.profiler`` (CPU) and splits the
profiled wall time by the self time of torch's operators: convolutions forward, convolutions backward,
linear layers (matrix products, forward and backward), the optimizer, every other torch operator, and what
lies outside torch operators (env stepping, preprocessing, numpy, Python). The profiler's own cost lands
mostly on the many small operators and on Python, so the shares are of the profiled run, not of the timed
one. Writes benchmarks/results/ppo_atari_profile.md.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stats  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ppo_atari_throughput.md"
PROFILE = ROOT / "benchmarks" / "results" / "ppo_atari_profile.md"
ARMS = ("rlprox", "rlprox-envpool", "sb3", "cleanrl")
SHAPE = dict(num_envs=8, num_steps=128, minibatches=4, epochs=4, lr=2.5e-4, clip=0.1, ent=0.01, vf=0.5, gamma=0.99)
SHAPE.update(gae_lambda=0.95, max_grad_norm=0.5)


def setup_worker():
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


# ----------------------------------------------------------------------------- workers


def worker_rlprox(game: str, seed: int, iterations: int, backend: str) -> dict:
    from rlprox.engine import Engine
    from rlprox.recipe import load_recipe

    out = tempfile.mkdtemp(prefix="atari_rlprox_")
    try:
        overrides = [
            f"env.id=ALE/{game}-v5",
            f"env.backend={backend}",
            f"seed={seed}",
            f"run.iterations={iterations}",
            f"run.output_dir={out}",
            "run.log_with=[]",
            "run.progress=false",
            "run.plot=false",
            "run.eval_size=0",
            "run.save_every=0",
        ]
        recipe = load_recipe(str(ROOT / "recipes/ppo/breakout.yaml"), overrides)
        engine = Engine(recipe)
        t0 = time.perf_counter()
        engine.fit()
        wall = time.perf_counter() - t0
        engine.close()
        rows = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "perf/collect_fraction" in r]
        collect = statistics.fmean(r["perf/collect_fraction"] for r in rows)
        return {"wall": wall, "steps": iterations * 1024, "collect_fraction": collect}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def worker_sb3(game: str, seed: int, iterations: int) -> dict:
    import ale_py
    import gymnasium as gym
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_atari_env
    from stable_baselines3.common.vec_env import VecFrameStack

    gym.register_envs(ale_py)
    venv = make_atari_env(
        f"ALE/{game}-v5",
        n_envs=SHAPE["num_envs"],
        seed=seed,
        env_kwargs={"frameskip": 1, "repeat_action_probability": 0.0},
    )
    venv = VecFrameStack(venv, n_stack=4)
    n = SHAPE["num_envs"] * SHAPE["num_steps"]
    model = PPO(
        "CnnPolicy",
        venv,
        n_steps=SHAPE["num_steps"],
        batch_size=n // SHAPE["minibatches"],
        n_epochs=SHAPE["epochs"],
        learning_rate=lambda f: f * SHAPE["lr"],
        clip_range=SHAPE["clip"],
        ent_coef=SHAPE["ent"],
        vf_coef=SHAPE["vf"],
        gamma=SHAPE["gamma"],
        gae_lambda=SHAPE["gae_lambda"],
        max_grad_norm=SHAPE["max_grad_norm"],
        seed=seed,
        device="cpu",
        verbose=0,
    )
    t0 = time.perf_counter()
    model.learn(total_timesteps=iterations * n)
    wall = time.perf_counter() - t0
    venv.close()
    return {"wall": wall, "steps": iterations * n, "collect_fraction": float("nan")}


def nature_cnn(actions: int):
    """CleanRL's ``ppo_atari.py`` Agent: the Nature CNN trunk, actor (gain 0.01) and critic (gain 1)."""
    import numpy as np
    import torch
    from torch import nn

    def init(layer, gain=np.sqrt(2)):
        nn.init.orthogonal_(layer.weight, gain)
        nn.init.constant_(layer.bias, 0.0)
        return layer

    class Agent(nn.Module):
        def __init__(self):
            super().__init__()
            self.network = nn.Sequential(
                init(nn.Conv2d(4, 32, 8, stride=4)),
                nn.ReLU(),
                init(nn.Conv2d(32, 64, 4, stride=2)),
                nn.ReLU(),
                init(nn.Conv2d(64, 64, 3, stride=1)),
                nn.ReLU(),
                nn.Flatten(),
                init(nn.Linear(64 * 7 * 7, 512)),
                nn.ReLU(),
            )
            self.actor = init(nn.Linear(512, actions), 0.01)
            self.critic = init(nn.Linear(512, 1), 1.0)

        def get_value(self, x):
            return self.critic(self.network(x / 255.0))

        def get_action_and_value(self, x, action=None):
            hidden = self.network(x / 255.0)
            dist = torch.distributions.Categorical(logits=self.actor(hidden))
            if action is None:
                action = dist.sample()
            return action, dist.log_prob(action), dist.entropy(), self.critic(hidden)

    return Agent()


def worker_cleanrl(game: str, seed: int, iterations: int) -> dict:
    """CleanRL's ppo_atari.py loop, written from its published structure (not copied)."""
    import ale_py
    import gymnasium as gym
    import numpy as np
    import torch
    from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation, TransformReward

    gym.register_envs(ale_py)

    def make():
        env = gym.make(f"ALE/{game}-v5", frameskip=1, repeat_action_probability=0.0)
        env = AtariPreprocessing(env, noop_max=30, frame_skip=4, terminal_on_life_loss=True)
        env = TransformReward(env, np.sign)
        return FrameStackObservation(env, 4)

    T, N = SHAPE["num_steps"], SHAPE["num_envs"]
    envs = gym.vector.SyncVectorEnv([make for _ in range(N)])
    torch.manual_seed(seed)
    agent = nature_cnn(envs.single_action_space.n)
    optimizer = torch.optim.Adam(agent.parameters(), lr=SHAPE["lr"], eps=1e-5)
    obs = torch.zeros((T, N, 4, 84, 84))
    actions, logprobs, rewards, dones, values = (torch.zeros((T, N)) for _ in range(5))
    next_obs, _ = envs.reset(seed=seed)
    next_obs, next_done = torch.tensor(next_obs, dtype=torch.float32), torch.zeros(N)
    batch, minibatch = T * N, T * N // SHAPE["minibatches"]
    collect_s = 0.0
    t0 = time.perf_counter()
    for iteration in range(iterations):
        optimizer.param_groups[0]["lr"] = (1.0 - iteration / iterations) * SHAPE["lr"]
        c0 = time.perf_counter()
        for step in range(T):
            obs[step], dones[step] = next_obs, next_done
            with torch.no_grad():
                action, logprob, _, value = agent.get_action_and_value(next_obs)
            values[step], actions[step], logprobs[step] = value.flatten(), action, logprob
            next_np, reward, term, trunc, _ = envs.step(action.numpy())
            rewards[step] = torch.tensor(reward, dtype=torch.float32)
            next_obs = torch.tensor(next_np, dtype=torch.float32)
            next_done = torch.tensor(np.logical_or(term, trunc), dtype=torch.float32)
        with torch.no_grad():
            next_value = agent.get_value(next_obs).flatten()
            advantages, last = torch.zeros_like(rewards), 0.0
            for t in reversed(range(T)):
                nonterminal = 1.0 - (next_done if t == T - 1 else dones[t + 1])
                following = next_value if t == T - 1 else values[t + 1]
                delta = rewards[t] + SHAPE["gamma"] * following * nonterminal - values[t]
                last = delta + SHAPE["gamma"] * SHAPE["gae_lambda"] * nonterminal * last
                advantages[t] = last
            returns = advantages + values
        collect_s += time.perf_counter() - c0
        b_obs, b_logprobs, b_actions = obs.reshape(batch, 4, 84, 84), logprobs.reshape(-1), actions.reshape(-1)
        b_adv, b_ret, b_val = advantages.reshape(-1), returns.reshape(-1), values.reshape(-1)
        for _ in range(SHAPE["epochs"]):
            order = np.random.permutation(batch)
            for start in range(0, batch, minibatch):
                idx = order[start : start + minibatch]
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_obs[idx], b_actions.long()[idx])
                ratio = (newlogprob - b_logprobs[idx]).exp()
                adv = (b_adv[idx] - b_adv[idx].mean()) / (b_adv[idx].std() + 1e-8)
                pg = torch.max(-adv * ratio, -adv * ratio.clamp(1 - SHAPE["clip"], 1 + SHAPE["clip"])).mean()
                newvalue = newvalue.flatten()
                clipped = b_val[idx] + (newvalue - b_val[idx]).clamp(-SHAPE["clip"], SHAPE["clip"])
                v_loss = 0.5 * torch.max((newvalue - b_ret[idx]) ** 2, (clipped - b_ret[idx]) ** 2).mean()
                loss = pg - SHAPE["ent"] * entropy.mean() + SHAPE["vf"] * v_loss
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(agent.parameters(), SHAPE["max_grad_norm"])
                optimizer.step()
    wall = time.perf_counter() - t0
    envs.close()
    return {"wall": wall, "steps": iterations * batch, "collect_fraction": collect_s / wall}


def update_floor(repeats: int = 2) -> float:
    """Seconds of one iteration's update with nothing but the network: 4 epochs × 4 minibatches of 256
    through the Nature CNN, forward and backward, Adam step (the floor every trainer shares)."""
    import torch

    agent = nature_cnn(4)
    optimizer = torch.optim.Adam(agent.parameters(), lr=2.5e-4)
    x, a = torch.rand(256, 4, 84, 84) * 255.0, torch.zeros(256, dtype=torch.long)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(SHAPE["epochs"] * SHAPE["minibatches"]):
            _, logprob, entropy, value = agent.get_action_and_value(x, a)
            loss = -logprob.mean() - 0.01 * entropy.mean() + value.pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        best = min(best, time.perf_counter() - t0)
    return best


def run_worker(arm: str, game: str, seed: int, iterations: int, profile: bool = False) -> dict:
    if not profile:
        return call_worker(arm, game, seed, iterations)
    import torch

    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = call_worker(arm, game, seed, iterations)
    result["profiled_s"] = time.perf_counter() - t0
    result["op_seconds"] = op_seconds(prof)
    return result


CATEGORIES = ("conv forward", "conv backward", "linear", "optimizer", "other torch ops")


def category(event) -> str:
    """The ``CATEGORIES`` entry of a profiled torch operator: the optimizer for anything run inside an
    ``Optimizer.step`` (Adam's element-wise operators included), else by the operator's name."""
    parent = event
    while parent is not None:
        if parent.name.startswith("Optimizer.step") or parent.name.startswith("Optimizer.zero_grad"):
            return "optimizer"
        parent = parent.cpu_parent
    name = event.name.lower()
    if "conv" in name:
        return "conv backward" if "backward" in name else "conv forward"
    if any(k in name for k in ("addmm", "aten::mm", "aten::matmul", "aten::linear", "aten::bmm")):
        return "linear"
    return "other torch ops"


def op_seconds(prof) -> dict:
    """Seconds of self CPU time per category, over every operator the profiler saw."""
    out = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.events():
        out[category(event)] += event.self_cpu_time_total / 1e6
    return out


def call_worker(arm: str, game: str, seed: int, iterations: int) -> dict:
    setup_worker()
    if arm == "rlprox":
        return worker_rlprox(game, seed, iterations, "gymnasium")
    if arm == "rlprox-envpool":
        return worker_rlprox(game, seed, iterations, "envpool")
    if arm == "sb3":
        return worker_sb3(game, seed, iterations)
    if arm == "floor":
        return {"update_s": update_floor()}
    return worker_cleanrl(game, seed, iterations)


def spawn(arm: str, game: str, seed: int, iterations: int, profile: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--worker", arm, "--game", game, "--seed", str(seed)]
    cmd += ["--iterations", str(iterations)] + (["--profile"] if profile else [])
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(f"{arm} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


# ----------------------------------------------------------------------------- table


def table(runs: dict, floor: float, args, arms: list[str]) -> str:
    sps = {arm: [r["steps"] / r["wall"] for r in runs[arm]] for arm in arms}
    rows = [
        f"# PPO from pixels: throughput on {args.game} (CPU, one process, one torch thread)",
        "",
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs (shared), python "
        f"{platform.python_version()}; `python benchmarks/ppo_atari_throughput.py --rounds {args.rounds} "
        f"--iterations {args.iterations} --game {args.game}`.",
        "",
        f"Each run: {args.iterations} PPO iterations of 8 envs × 128 agent steps (= 4 frames each) with the "
        "Breakout recipe's update (4 epochs × 4 minibatches of 256, Nature CNN), first iteration included, in a "
        "fresh process; arms alternated per round, the order reversed every other round. env steps/s = agent "
        "steps / wall seconds of the training call. Ratios are paired within a round: mean of the per-round "
        "ratios [Student-t 95% interval; exploratory below 5 rounds].",
        "",
        "| arm | env steps/s (mean ± sd over rounds) | collect share of an iteration | rounds |",
        "|---|---|---|---|",
    ]
    for arm in arms:
        share = [r["collect_fraction"] for r in runs[arm] if r["collect_fraction"] == r["collect_fraction"]]
        share_text = f"{statistics.fmean(share):.0%}" if share else "not measured (SB3)"
        sd = statistics.stdev(sps[arm]) if len(sps[arm]) > 1 else float("nan")
        rows.append(f"| {arm} | {statistics.fmean(sps[arm]):.0f} ± {sd:.0f} | {share_text} | {len(sps[arm])} |")
    rows += ["", "| ratio | per round | mean [t 95%] |", "|---|---|---|"]
    for mine, theirs in (("rlprox", "sb3"), ("rlprox", "cleanrl"), ("rlprox-envpool", "rlprox")):
        if mine not in sps or theirs not in sps:
            continue
        ratios = [a / b for a, b in zip(sps[mine], sps[theirs])]
        lo, hi = stats.mean_interval(ratios)
        tag = ", exploratory" if stats.is_exploratory(len(ratios)) else ""
        per = ", ".join(f"{r:.2f}" for r in ratios)
        rows.append(f"| {mine} / {theirs} | {per} | {statistics.fmean(ratios):.2f} [{lo:.2f}, {hi:.2f}]{tag} |")
    it_s = {arm: 1024 / statistics.fmean(sps[arm]) for arm in arms}
    rows += [
        "",
        f"Where the time goes: the update alone — the Nature CNN forward + backward + Adam over one iteration's "
        f"16 minibatches of 256, nothing else — takes {floor:.1f} s on this machine (best of 2), against "
        + ", ".join(f"{arm} {t:.1f} s" for arm, t in it_s.items())
        + " per whole iteration (1,024 steps).",
    ]
    return "\n".join(rows) + "\n"


def profile_table(runs: dict, args) -> str:
    rows = [
        f"# PPO from pixels: where the time goes on {args.game} (CPU, one process, one torch thread)",
        "",
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs (shared), python "
        f"{platform.python_version()}; `python benchmarks/ppo_atari_throughput.py --profile --iterations "
        f"{args.iterations} --game {args.game}`.",
        "",
        f"Each arm once, in a fresh process under torch.profiler (CPU): {args.iterations} PPO iterations of the "
        "Breakout recipe's shape (8 envs × 128 steps, 4 epochs × 4 minibatches of 256, the Nature CNN), env "
        "creation and the first iteration included. Shares of the profiled wall time by the self time of torch "
        "operators; 'outside torch ops' is the rest (env stepping, frame preprocessing, numpy, Python). The "
        "profiler's overhead inflates the small operators and Python, so compare shares across arms, not with "
        "the timed table.",
        "",
        "| arm | profiled s | " + " | ".join(CATEGORIES) + " | outside torch ops | convolutions in all |",
        "|---" * (len(CATEGORIES) + 4) + "|",
    ]
    for arm, r in runs.items():
        ops, wall = r["op_seconds"], r["profiled_s"]
        outside = max(0.0, wall - sum(ops.values()))
        conv = ops["conv forward"] + ops["conv backward"]
        rows.append(
            f"| {arm} | {wall:.1f} | "
            + " | ".join(f"{ops[c] / wall:.0%}" for c in CATEGORIES)
            + f" | {outside / wall:.0%} | **{conv / wall:.0%}** |"
        )
    return "\n".join(rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=3, help="PPO iterations (1,024 steps) per run")
    parser.add_argument("--game", default="Breakout")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--quick", action="store_true", help="1 round, 1 iteration")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help="each arm once under torch.profiler")
    args = parser.parse_args()
    if args.worker:
        result = run_worker(args.worker, args.game, args.seed, args.iterations, args.profile)
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    if args.quick:
        args.rounds, args.iterations = 1, 1
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown {', '.join(unknown)}")
    if args.profile:
        runs = {arm: spawn(arm, args.game, 1, args.iterations, profile=True) for arm in arms}
        text = profile_table(runs, args)
        print(text)
        out = Path(args.out or PROFILE)
        out.write_text(text)
        print(f"wrote {out}")
        return 0
    runs = {arm: [] for arm in arms}
    for r in range(args.rounds):
        order = arms if r % 2 == 0 else arms[::-1]
        for arm in order:
            result = spawn(arm, args.game, r + 1, args.iterations)
            runs[arm].append(result)
            print(f"round {r + 1} {arm}: {result['steps'] / result['wall']:.0f} steps/s", flush=True)
    floor = spawn("floor", args.game, 1, 1)["update_s"]
    text = table(runs, floor, args, arms)
    print(text)
    out = args.out or (None if args.quick else RESULTS)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
