"""More processes must not mean slower training: PPO CartPole, 1 process vs 2 (torchrun,
gloo), side by side in one run.

    python benchmarks/ppo_scaling.py              # 5 alternated rounds, both configs
    python benchmarks/ppo_scaling.py --rounds 1 --iterations 10   # smoke

Configs (per process; 2 processes collect twice the samples per iteration):
- cleanrl: CleanRL's CartPole hyperparameters, 8 envs × 128 steps, 4 minibatches of
  256, 4 epochs (16 optimizer steps, each one gradient all-reduce with 2 processes);
- recipe: the shipped recipes/ppo/cartpole.yaml (8 envs × 32 steps, 20 epochs of one
  minibatch of 256).

Training steps/s = all processes' env steps / the run's summed iteration wall time
(``state.json`` ``wall_time``: collect + update + logging, start-up and checkpointing
excluded). Each run is a fresh ``rlprox train`` process tree; runs alternate 1/2 with
the order reversed every other round; the ratio is the median of per-round paired
ratios. Writes benchmarks/results/ppo_scaling.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "ppo_scaling.md"

CONFIGS = {
    "cleanrl": [
        "env.num_envs=8",
        "ppo.num_steps=128",
        "ppo.minibatch_size=256",
        "ppo.update_epochs=4",
        "ppo.gamma=0.99",
        "ppo.gae_lambda=0.95",
        "ppo.ent_coef=0.01",
        "optim.lr=2.5e-4",
        "optim.lr_schedule=linear",
    ],
    "recipe": [],
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(config: str, procs: int, iterations: int, seed: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix="ppo_scaling_"))
    try:
        args = [
            "train",
            str(ROOT / "recipes/ppo/cartpole.yaml"),
            *CONFIGS[config],
            f"run.iterations={iterations}",
            f"seed={seed}",
            f"run.output_dir={out}",
            "run.name=r",
            "run.log_with=[]",
            "run.progress=false",
            "run.plot=false",
            "run.eval_size=0",
            "run.save_every=0",
        ]
        bindir = os.path.dirname(sys.executable)
        if procs == 1:
            cmd = [sys.executable, "-m", "rlprox", *args]
        else:
            cmd = [
                shutil.which("torchrun", path=bindir),
                "--nproc_per_node",
                str(procs),
                "--master_port",
                str(free_port()),
                "-m",
                "rlprox",
                *args,
            ]
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        ckpt = sorted((out / "r" / "checkpoints").glob("iter-*"))[-1]
        state = json.loads((ckpt / "state.json").read_text())
        rows = [json.loads(line) for line in (out / "r" / "metrics.jsonl").read_text().splitlines()]
        steps = rows[-1]["progress/env_steps"]
        return {
            "steps": steps,
            "wall": state["wall_time"],
            "sps": steps / state["wall_time"],
            "return_last": rows[-1].get("reward/episodic_return"),
        }
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--iterations", type=int, default=0, help="iterations per run (default: 48 for cleanrl, 390 for recipe)"
    )
    parser.add_argument("--configs", default="cleanrl,recipe")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    results: dict[str, dict[int, list]] = {}
    for config in args.configs.split(","):
        iterations = args.iterations or {"cleanrl": 48, "recipe": 390}[config]
        results[config] = {1: [], 2: []}
        for r in range(args.rounds):
            order = (1, 2) if r % 2 == 0 else (2, 1)
            for procs in order:
                res = run(config, procs, iterations, seed=1 + r)
                results[config][procs].append(res)
                print(f"{config} round {r + 1}: {procs} process(es) {res['sps']:,.0f} steps/s", flush=True)
    lines = [
        "# PPO CartPole: 1 process vs 2 processes (torchrun, gloo)",
        "",
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs, python "
        f"{platform.python_version()}; `python benchmarks/ppo_scaling.py --rounds {args.rounds}`.",
        "Training steps/s = env steps of all processes / summed iteration "
        "wall time. Ratio = median of per-round paired ratios (min–max).",
        "",
        "| config | per-process rollout | 1 process steps/s | 2 processes steps/s | 2 / 1 (paired, min–max) |",
        "|---|---|---|---|---|",
    ]
    for config, by in results.items():
        one = [x["sps"] for x in by[1]]
        two = [x["sps"] for x in by[2]]
        ratios = [b / a for a, b in zip(one, two)]
        rollout = (
            "8 envs × 128 steps, 4 minibatches × 4 epochs"
            if config == "cleanrl"
            else "8 envs × 32 steps, 1 minibatch × 20 epochs"
        )
        lines.append(
            f"| {config} | {rollout} | {statistics.median(one):,.0f} | {statistics.median(two):,.0f} "
            f"| **{statistics.median(ratios):.2f}** ({min(ratios):.2f}–{max(ratios):.2f}) |"
        )
    lines += ["", "Per round (steps/s, 1 process / 2 processes):", ""]
    for config, by in results.items():
        lines.append(f"- {config}: " + ", ".join(f"{a['sps']:,.0f} / {b['sps']:,.0f}" for a, b in zip(by[1], by[2])))
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
