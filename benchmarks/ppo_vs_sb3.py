"""rlprox PPO vs Stable-Baselines3 PPO: training throughput and return, same hyperparameters.

    python benchmarks/ppo_vs_sb3.py                 # full: 7 rounds CartPole, 3 seeds, 3 rounds Hopper
    python benchmarks/ppo_vs_sb3.py --quick         # smoke test (1 round, 1 seed, few iterations, < 2 min)
    python benchmarks/ppo_vs_sb3.py --rounds 7 --seeds 3 --hopper-rounds 3 --hopper-iters 3

Every run is a FRESH subprocess (the script re-invokes itself with ``--worker``) so no
trainer warms another's caches or allocator; runs are alternated A/B/raw, the order
reversed every other round. Each worker prints one ``RESULT {json}`` line.

SPS is wall-clock env steps per second of the training call only (``Engine.fit()`` /
``PPO.learn()``; construction and evaluation excluded), first iteration included.
Ratios are medians of per-round paired ratios (same round, adjacent runs), which cancel
most of the load swings of a shared machine. The raw-env ceiling is random actions in
the same kind of vector env (gymnasium SyncVectorEnv, SAME_STEP autoreset, plain
gym.make envs), no policy, no learning.

Writes the markdown table to benchmarks/results/ppo_vs_sb3.md (not with --quick unless
--out is given).
"""

from __future__ import annotations

import os

for _var in (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ppo_vs_sb3.md"

# ----------------------------------------------------------------------------- tasks
# One dict per task; both trainers are configured from it (rlprox recipe / SB3 kwargs).
TASKS = {
    "cartpole": dict(
        env_id="CartPole-v1",
        num_envs=8,
        num_steps=128,
        minibatch_size=256,
        update_epochs=4,
        lr=2.5e-4,
        gamma=0.99,
        gae_lambda=0.95,
        clip=0.2,
        ent_coef=0.01,
        vf_coef=0.5,
        max_grad_norm=0.5,
        normalize=False,
        iterations=48,
        last_k=5,
        eval_size=20,
    ),
    "hopper": dict(
        env_id="Hopper-v5",
        num_envs=1,
        num_steps=2048,
        minibatch_size=64,
        update_epochs=10,
        lr=3e-4,
        gamma=0.99,
        gae_lambda=0.95,
        clip=0.2,
        ent_coef=0.0,
        vf_coef=0.5,
        max_grad_norm=0.5,
        normalize=True,
        iterations=3,
        last_k=1,
        eval_size=5,
    ),
}


def _peak_rss_mb() -> float:
    # Linux: KiB. NB on exec the kernel carries the pre-exec image's high-water mark into
    # ru_maxrss, so the driver keeps itself lean (no torch/SB3 import) to not set a floor.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _vm_hwm_mb() -> float | None:
    """Peak RSS of this process image only (/proc VmHWM), a cross-check of ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _setup_worker():
    import torch

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)


# ----------------------------------------------------------------------------- workers
def worker_rlprox(task: dict, seed: int, iterations: int, do_eval: bool) -> dict:
    _setup_worker()
    from rlprox.engine import Engine
    from rlprox.recipe import load_recipe

    out = tempfile.mkdtemp(prefix="ppo_vs_sb3_rlprox_")
    try:
        env = {"id": task["env_id"], "num_envs": task["num_envs"]}
        if task["normalize"]:
            env.update(normalize_obs=True, normalize_reward=True)
        recipe = load_recipe(
            {
                "algo": "ppo",
                "seed": seed,
                "run": {
                    "name": "bench",
                    "output_dir": out,
                    "iterations": iterations,
                    "log_with": [],
                    "progress": False,
                    "plot": False,
                    "eval_size": 0,
                    "save_every": 0,
                    "torch_threads": 1,
                },
                "env": env,
                "ppo": {
                    "num_steps": task["num_steps"],
                    "minibatch_size": task["minibatch_size"],
                    "update_epochs": task["update_epochs"],
                    "gamma": task["gamma"],
                    "gae_lambda": task["gae_lambda"],
                    "clip_coef": task["clip"],
                    "clip_vloss": True,
                    "ent_coef": task["ent_coef"],
                    "vf_coef": task["vf_coef"],
                    "norm_adv": True,
                    "hidden_sizes": [64, 64],
                    "activation": "tanh",
                },
                "optim": {
                    "name": "adam",
                    "lr": task["lr"],
                    "eps": 1e-5,
                    "lr_schedule": "linear",
                    "max_grad_norm": task["max_grad_norm"],
                },
            }
        )
        engine = Engine(recipe)
        steps = iterations * task["num_envs"] * task["num_steps"]
        t0, c0 = time.perf_counter(), time.process_time()
        engine.fit()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rss = _peak_rss_mb()
        # training return: episodes finished in the last `last_k` rollouts (exact mean,
        # per-iteration means weighted by their episode counts)
        rows = [
            json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()
        ]
        rows = [r for r in rows if "progress/env_steps" in r]
        first_step = steps - task["last_k"] * task["num_envs"] * task["num_steps"]
        tot = n = 0.0
        for r in rows:
            if r["progress/env_steps"] > first_step and r.get("reward/episodes"):
                tot += r["reward/episodic_return"] * r["reward/episodes"]
                n += r["reward/episodes"]
        train_return = tot / n if n else float("nan")
        eval_return = None
        if do_eval:
            eval_return = float(engine.evaluate(task["eval_size"])["eval/return"])
        engine.close()
        return dict(
            steps=steps,
            wall=wall,
            sps=steps / wall,
            cpu=cpu,
            cpu_sps=steps / cpu,
            rss_mb=rss,
            train_return=train_return,
            train_episodes=n,
            eval_return=eval_return,
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)


def worker_sb3(task: dict, seed: int, iterations: int, do_eval: bool) -> dict:
    _setup_worker()
    import numpy as np
    import torch.nn as nn
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.vec_env import VecNormalize

    env = make_vec_env(task["env_id"], n_envs=task["num_envs"], seed=seed)  # DummyVecEnv + Monitor
    if task["normalize"]:
        env = VecNormalize(env, norm_obs=True, norm_reward=True, clip_obs=10.0, clip_reward=10.0, gamma=task["gamma"])
    lr0 = task["lr"]
    # SB3 evaluates the schedule AFTER each rollout (progress_remaining = 1 - k/N at
    # iteration k); rlprox's LambdaLR uses 1 - (k-1)/N. Shift by one iteration so both
    # use exactly the same lr at every update.
    shift = 1.0 / iterations

    def lr_schedule(progress_remaining: float) -> float:
        return lr0 * min(1.0, progress_remaining + shift)

    model = PPO(
        "MlpPolicy",
        env,
        n_steps=task["num_steps"],
        batch_size=task["minibatch_size"],
        n_epochs=task["update_epochs"],
        learning_rate=lr_schedule,
        gamma=task["gamma"],
        gae_lambda=task["gae_lambda"],
        clip_range=task["clip"],
        clip_range_vf=task["clip"],
        normalize_advantage=True,
        ent_coef=task["ent_coef"],
        vf_coef=task["vf_coef"],
        max_grad_norm=task["max_grad_norm"],
        seed=seed,
        device="cpu",
        verbose=0,
        policy_kwargs=dict(
            net_arch=dict(pi=[64, 64], vf=[64, 64]),
            activation_fn=nn.Tanh,
            ortho_init=True,
            optimizer_kwargs=dict(eps=1e-5),
        ),
    )
    steps = iterations * task["num_envs"] * task["num_steps"]
    t0, c0 = time.perf_counter(), time.process_time()
    model.learn(total_timesteps=steps, progress_bar=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rss = _peak_rss_mb()
    assert model.num_timesteps == steps, (model.num_timesteps, steps)
    # training return: episodes that ended in the last `last_k` rollouts, read from each
    # Monitor's full episode list (no callback, so no per-step overhead while timing)
    venv = env.venv if task["normalize"] else env
    per_env = iterations * task["num_steps"]
    first = per_env - task["last_k"] * task["num_steps"]
    rets = []
    for e in venv.envs:
        ends = np.cumsum(e.get_episode_lengths())
        rets += [r for r, end in zip(e.get_episode_rewards(), ends) if end > first]
    train_return = float(np.mean(rets)) if rets else float("nan")
    eval_return = None
    if do_eval:
        eval_env = make_vec_env(task["env_id"], n_envs=1, seed=seed + 1_000_003)
        if task["normalize"]:
            eval_env = VecNormalize(eval_env, training=False, norm_obs=True, norm_reward=False, clip_obs=10.0)
            eval_env.obs_rms = env.obs_rms
        mean, _ = evaluate_policy(model, eval_env, n_eval_episodes=task["eval_size"], deterministic=True)
        eval_return = float(mean)
    return dict(
        steps=steps,
        wall=wall,
        sps=steps / wall,
        cpu=cpu,
        cpu_sps=steps / cpu,
        rss_mb=rss,
        train_return=train_return,
        train_episodes=len(rets),
        eval_return=eval_return,
    )


def worker_raw(task: dict, seed: int, iterations: int, do_eval: bool) -> dict:
    import gymnasium as gym
    import numpy as np

    n = task["num_envs"]
    envs = gym.vector.SyncVectorEnv(
        [lambda: gym.make(task["env_id"]) for _ in range(n)], autoreset_mode=gym.vector.AutoresetMode.SAME_STEP
    )
    rng = np.random.default_rng(seed)
    space = envs.single_action_space
    T = iterations * task["num_steps"]
    if isinstance(space, gym.spaces.Discrete):
        actions = rng.integers(0, space.n, size=(T, n))
    else:
        actions = rng.uniform(space.low, space.high, size=(T, n) + space.shape).astype(space.dtype)
    envs.reset(seed=seed)
    t0, c0 = time.perf_counter(), time.process_time()
    for t in range(T):
        envs.step(actions[t])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    envs.close()
    steps = T * n
    return dict(
        steps=steps,
        wall=wall,
        sps=steps / wall,
        cpu=cpu,
        cpu_sps=steps / cpu,
        rss_mb=_peak_rss_mb(),
        train_return=None,
        train_episodes=None,
        eval_return=None,
    )


def worker_torch_only(task: dict, seed: int, iterations: int, do_eval: bool) -> dict:
    """Peak RSS of a process that only imports torch: the floor under both trainers."""
    _setup_worker()
    return dict(rss_mb=_peak_rss_mb())


WORKERS = {"rlprox": worker_rlprox, "sb3": worker_sb3, "raw": worker_raw}
EXTRA_WORKERS = {"torch-only": worker_torch_only}


# ----------------------------------------------------------------------------- driver
def run_worker(kind: str, task: str, seed: int, iterations: int, do_eval: bool) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        kind,
        "--task",
        task,
        "--seed",
        str(seed),
        "--iterations",
        str(iterations),
    ] + (["--eval"] if do_eval else [])
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[var] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"worker {kind} {task} seed {seed} failed (rc {proc.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


def source_state() -> tuple[str, str]:
    """(git commit + rlprox/ clean/modified, sha256 of every rlprox/*.py): taken before and
    after the benchmark so a run that straddles a code change says so."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((ROOT / "rlprox").rglob("*.py")):
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "rlprox"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
        desc = f"commit {commit or '?'}" + (", rlprox/ has uncommitted changes" if dirty else ", rlprox/ clean")
    except OSError:
        desc = "commit unknown"
    return desc, h.hexdigest()[:12]


def _med(xs):
    return statistics.median(xs) if xs else float("nan")


def _mean_std(xs):
    xs = [x for x in xs if x is not None and x == x]
    if not xs:
        return "–"
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.1f} ± {sd:.1f} (n={len(xs)})"


def _ratio(a, b):
    r = [x / y for x, y in zip(a, b)]
    return f"{_med(r):.2f} ({min(r):.2f}–{max(r):.2f})", r


def bench_task(task_name: str, rounds: int, seeds: int, iterations: int) -> dict:
    """rounds alternated rounds; round i uses seed i+1; returns evaluated for i < seeds."""
    n_rounds = max(rounds, seeds)
    res = {k: [] for k in WORKERS}
    for i in range(n_rounds):
        seed = i + 1
        order = list(WORKERS) if i % 2 == 0 else list(reversed(list(WORKERS)))
        for kind in order:
            r = run_worker(kind, task_name, seed, iterations, do_eval=i < seeds)
            r["seed"] = seed
            res[kind].append(r)
            ret = "" if r["train_return"] is None else f"  train {r['train_return']:.1f}"
            ev = "" if r["eval_return"] is None else f"  eval {r['eval_return']:.1f}"
            print(
                f"  [{task_name} round {i + 1}/{n_rounds}] {kind:6s} "
                f"{r['sps']:9.0f} steps/s ({r['cpu_sps']:.0f}/CPU-s)"
                f"  rss {r['rss_mb']:.0f} MB{ret}{ev}",
                flush=True,
            )
    return res


def table(all_res: dict, cfg: dict) -> tuple[str, list[str]]:
    head = (
        "| task | trainer | training SPS (median) | × SB3, paired (min–max) | × raw env, paired (min–max) "
        "| greedy eval return (mean ± std over seeds) | training "
        "return, last rollouts (mean ± std) | peak RSS MB (median) |"
    )
    lines = [head, "|" + "---|" * 8]
    verdicts = []
    for task_name, res in all_res.items():
        t = TASKS[task_name]
        sps = {k: [r["sps"] for r in v] for k, v in res.items()}
        label = (
            f"{t['env_id']} ({t['num_envs']}×{t['num_steps']}, "
            f"{cfg[task_name]['iterations']} it = {res['raw'][0]['steps']:,} steps)"
        )
        for kind, name in (("rlprox", "rlprox PPO"), ("sb3", "SB3 PPO"), ("raw", "raw env, random actions")):
            vs_sb3 = _ratio(sps[kind], sps["sb3"])[0] if kind != "raw" else "–"
            vs_raw = _ratio(sps[kind], sps["raw"])[0] if kind != "raw" else "1"
            if kind == "sb3":
                vs_sb3 = "1"
            ev = _mean_std([r["eval_return"] for r in res[kind]]) if kind != "raw" else "–"
            tr = _mean_std([r["train_return"] for r in res[kind]]) if kind != "raw" else "–"
            lines.append(
                f"| {label} | {name} | {_med(sps[kind]):,.0f} | {vs_sb3} | {vs_raw} | {ev} | {tr} "
                f"| {_med([r['rss_mb'] for r in res[kind]]):.0f} |"
            )
        if task_name == "cartpole":
            _, r_sb3 = _ratio(sps["rlprox"], sps["sb3"])
            _, r_raw = _ratio(sps["rlprox"], sps["raw"])
            ok = _med(r_sb3) >= 2.0
            verdicts.append(
                f"**{'PASS' if ok else 'FAIL'}: rlprox ≥ 2× SB3 SPS on CartPole** — median paired ratio "
                f"{_med(r_sb3):.2f}× (min {min(r_sb3):.2f}, max {max(r_sb3):.2f}; "
                f"{sum(x >= 2.0 for x in r_sb3)}/{len(r_sb3)} rounds ≥ 2×)."
            )
            verdicts.append(
                f"**Raw-env fraction on CartPole: {_med(r_raw):.2f}×** (min {min(r_raw):.2f}, max {max(r_raw):.2f}); "
                f"goal ≥ 0.5×: {'MET' if _med(r_raw) >= 0.5 else 'NOT MET'}."
            )
            cpu = {k: [r["cpu_sps"] for r in v] for k, v in res.items()}
            _, c_sb3 = _ratio(cpu["rlprox"], cpu["sb3"])
            _, c_raw = _ratio(cpu["rlprox"], cpu["raw"])
            verdicts.append(
                f"Cross-check by CPU time (steps per CPU-second of the training call, much less sensitive to the "
                f"other jobs than wall-clock): rlprox/SB3 {_med(c_sb3):.2f}× ({min(c_sb3):.2f}–{max(c_sb3):.2f}), "
                f"rlprox/raw {_med(c_raw):.2f}× ({min(c_raw):.2f}–{max(c_raw):.2f})."
            )
    cpu_lines = [
        "| task | trainer | steps per CPU-second (median) | × SB3, paired (min–max) | × raw env, paired (min–max) |",
        "|" + "---|" * 5,
    ]
    for task_name, res in all_res.items():
        cpu = {k: [r["cpu_sps"] for r in v] for k, v in res.items()}
        for kind, name in (("rlprox", "rlprox PPO"), ("sb3", "SB3 PPO"), ("raw", "raw env, random actions")):
            vs_sb3 = "1" if kind == "sb3" else ("–" if kind == "raw" else _ratio(cpu[kind], cpu["sb3"])[0])
            vs_raw = "1" if kind == "raw" else _ratio(cpu[kind], cpu["raw"])[0]
            cpu_lines.append(
                f"| {TASKS[task_name]['env_id']} | {name} | {_med(cpu[kind]):,.0f} | {vs_sb3} | {vs_raw} |"
            )
    return "\n".join(lines), verdicts, "\n".join(cpu_lines)


def per_round(all_res: dict) -> str:
    out = [
        "| task | round (seed) | rlprox SPS | SB3 SPS | raw SPS | rlprox/SB3 | rlprox/raw "
        "| rlprox/SB3 (CPU time) | rlprox eval | SB3 eval | rlprox train | SB3 train |",
        "|" + "---|" * 12,
    ]

    def f(x):
        return "–" if x is None else f"{x:.1f}"

    for task_name, res in all_res.items():
        for a, b, c in zip(res["rlprox"], res["sb3"], res["raw"]):
            out.append(
                f"| {task_name} | {a['seed']} | {a['sps']:,.0f} | {b['sps']:,.0f} | {c['sps']:,.0f} "
                f"| {a['sps'] / b['sps']:.2f} | {a['sps'] / c['sps']:.2f} | "
                f"{a['cpu_sps'] / b['cpu_sps']:.2f} | {f(a['eval_return'])} | {f(b['eval_return'])} "
                f"| {f(a['train_return'])} | {f(b['train_return'])} |"
            )
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="alternated CartPole rounds (SPS)")
    p.add_argument(
        "--seeds", type=int, default=3, help="CartPole seeds with a greedy evaluation (seeds 1..N = rounds 1..N)"
    )
    p.add_argument("--hopper-rounds", type=int, default=3, help="alternated Hopper rounds (0: skip Hopper)")
    p.add_argument("--hopper-iters", type=int, default=3, help="Hopper iterations of 2048 steps")
    p.add_argument("--cartpole-iters", type=int, default=48, help="CartPole iterations of 8×128 steps")
    p.add_argument(
        "--quick", action="store_true", help="smoke test: 1 round, 1 seed, 8 CartPole / 1 Hopper iterations"
    )
    p.add_argument(
        "--out", type=Path, default=None, help=f"results file (default {RESULTS.relative_to(ROOT)}; none with --quick)"
    )
    # worker mode (internal)
    p.add_argument("--worker", choices=list(WORKERS) + list(EXTRA_WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--task", choices=list(TASKS), help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--iterations", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--eval", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        import warnings

        warnings.filterwarnings("ignore")
        task = dict(TASKS[args.task])
        result = {**WORKERS, **EXTRA_WORKERS}[args.worker](
            task, args.seed, args.iterations or task["iterations"], args.eval
        )
        result["vm_hwm_mb"] = _vm_hwm_mb()
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    if args.quick:
        args.rounds, args.seeds, args.cartpole_iters = 1, 1, 8
        args.hopper_rounds, args.hopper_iters = min(args.hopper_rounds, 1), 1
    out_path = args.out if args.out is not None else (None if args.quick else RESULTS)

    from importlib.metadata import version  # not importing torch/SB3 here keeps workers' ru_maxrss honest

    cfg = {"cartpole": {"iterations": args.cartpole_iters}, "hopper": {"iterations": args.hopper_iters}}
    src_before = source_state()
    start = time.perf_counter()
    torch_rss = run_worker("torch-only", "cartpole", 1, 0, False)["rss_mb"]
    all_res = {}
    print(
        f"CartPole-v1: {max(args.rounds, args.seeds)} rounds × (rlprox, SB3, raw), {args.cartpole_iters} iterations",
        flush=True,
    )
    all_res["cartpole"] = bench_task("cartpole", args.rounds, args.seeds, args.cartpole_iters)
    if args.hopper_rounds > 0:
        print(
            f"Hopper-v5: {args.hopper_rounds} rounds × (rlprox, SB3, raw), {args.hopper_iters} iterations", flush=True
        )
        all_res["hopper"] = bench_task("hopper", args.hopper_rounds, args.hopper_rounds, args.hopper_iters)
    total = time.perf_counter() - start
    src_after = source_state()

    tab, verdicts, cpu_tab = table(all_res, cfg)
    cores = os.cpu_count()
    try:
        load = os.getloadavg()
        load_s = f"load average {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f} at the end"
    except OSError:
        load_s = ""
    header = [
        "# rlprox PPO vs Stable-Baselines3 PPO (CPU)",
        "",
        f"Date {datetime.date.today().isoformat()}; torch {version('torch')}, gymnasium {version('gymnasium')}, "
        f"stable-baselines3 {version('stable_baselines3')}, mujoco {version('mujoco')}, "
        f"Python {platform.python_version()}, {platform.machine()}. "
        f"Machine: {cores} CPU cores, **shared with other jobs** ({load_s}), so absolute steps/s swing ±30%; "
        "read the paired ratios. Every process: 1 torch thread, OMP/MKL/OpenBLAS 1 thread. "
        f"Total benchmark wall time {total / 60:.1f} min. Peak RSS is dominated by the torch import: a process "
        f"that only imports torch peaks at {torch_rss:.0f} MB.",
        "",
        f"rlprox source: {src_after[0]}; rlprox/*.py sha256 {src_after[1]}"
        + (
            "."
            if src_before == src_after
            else f". **WARNING: the rlprox source changed during this run (before: {src_before[0]}, {src_before[1]}); "
            "the rounds mix code versions, rerun.**"
        ),
        "",
        "Command: `" + " ".join(["python benchmarks/ppo_vs_sb3.py"] + sys.argv[1:]) + "`",
        "",
        "Method: each run is a fresh subprocess; per round the order is rlprox → SB3 → raw, reversed every other "
        "round; round i uses seed i. SPS = env steps / wall-clock of `Engine.fit()` or `PPO.learn()` "
        "(construction and evaluation excluded, first iteration included). Ratios are the median (min–max) of "
        "per-round paired ratios. Raw env = gymnasium `SyncVectorEnv` of plain `gym.make` envs, SAME_STEP "
        "autoreset, pre-drawn random actions, no policy.",
        "",
        "Same hyperparameters for both trainers: separate 64-64 "
        "tanh actor and critic, orthogonal init, Adam eps 1e-5, "
        "lr annealed linearly to 0 (SB3's schedule shifted by one iteration so both use the same lr at every update), "
        "GAE, advantage normalisation per minibatch, clip 0.2, value clip 0.2, vf 0.5, grad-norm 0.5.",
        f"- CartPole-v1: 8 envs × 128 steps, 4 minibatches of 256, 4 epochs, lr 2.5e-4, γ 0.99, λ 0.95, ent 0.01; "
        f"{max(args.rounds, args.seeds)} rounds of {args.cartpole_iters} iterations "
        f"({args.cartpole_iters * 1024:,} steps). Greedy eval: 20 episodes (rlprox `engine.evaluate(20)`, SB3 "
        f"`evaluate_policy(..., 20, deterministic=True)`) for seeds 1..{args.seeds}. Training return = mean over the "
        "episodes that ended in the last 5 rollouts (5,120 steps).",
    ]
    if "hopper" in all_res:
        header.append(
            f"- Hopper-v5: 1 env × 2048 steps, minibatch 64, 10 epochs, lr 3e-4, ent 0, obs + reward normalisation "
            f"(rlprox `normalize_obs/normalize_reward`, SB3 `VecNormalize(gamma=0.99)`); {args.hopper_rounds} rounds "
            f"(seeds 1..{args.hopper_rounds}) of only {args.hopper_iters} "
            f"iterations ({args.hopper_iters * 2048:,} steps; "
            "the recipe's budget is 1M) for speed. **Hopper returns at this budget are a sanity number only** "
            "(greedy eval: 5 episodes; training return: episodes ended in the last rollout)."
        )
    if args.quick:
        header.append("- **--quick smoke test: 1 round, 1 seed, shortened runs; not a benchmark.**")
    body = (
        "\n".join(header)
        + "\n\n"
        + tab
        + "\n\n"
        + "\n".join(f"- {v}" for v in verdicts)
        + "\n\n## CPU-time view (same runs)\n\nEach worker is "
        "single-threaded, so on an idle machine CPU time ≈ wall time; "
        "on this shared one, CPU time leaves out the time the process waited for a core.\n\n"
        + cpu_tab
        + "\n\n## Per round\n\n"
        + per_round(all_res)
        + "\n"
    )
    print()
    print(body)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(body)
        print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
