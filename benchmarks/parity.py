"""LOOP's numbers against another commit's: a 2-iteration run on tiny random-weight DDIM (SD-1.5
architecture) and SD3 pipelines, in this tree and in REV's, with the same recipe; the final
LoRA tensors must be bit-identical and every logged stat equal (a refactor's check).

    python benchmarks/parity.py --rev HEAD~1            # writes benchmarks/results/parity.md

Each tree runs in a fresh subprocess with its own ``rlprox`` first on sys.path. The recipe uses
the section keys of before the vocabulary change (``clip_range``, ``eta``, ...), which this
tree still reads as deprecated aliases; the DDIM run evaluates (η and η = 0, base and tuned),
the SD3 run adds a ``kl_ref`` term on a window of steps.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, os, sys
tree, out, pipes = sys.argv[1:4]
sys.path.insert(0, tree)
os.environ["HF_HUB_OFFLINE"] = "1"
import torch
torch.set_num_threads(1)
import rlprox
assert rlprox.__file__.startswith(tree), rlprox.__file__
from safetensors.torch import save_file
from rlprox.engine import Engine
from rlprox.recipe import load_recipe

for name, flow in (("sd", False), ("sd3", True)):
    loop = {"pipeline": f"{pipes}/tiny-{name}", "num_samples_per_prompt": 2, "prompts_per_iteration": 2,
            "num_steps": 4 if flow else 3, "sample_batch_size": 4, "guidance_scale": 2.0,
            "score_in_background": False, "train_batch_size": 2, "clip_range": 0.2, "num_inner_epochs": 2}
    loop.update({"noise_level": 0.7, "sde_window": [0, 3], "max_sequence_length": 8} if flow else {"eta": 0.8})
    recipe = {"algo": "loop", "seed": 2, "loop": loop, "reward": "brightness",
              "run": {"name": name, "output_dir": out, "iterations": 2, "log_with": [], "progress": False,
                      "plot": False, "eval_size": 0 if flow else 4},
              "optim": {"name": "adamw", "lr": 1e-3, "max_grad_norm": 1.0},
              "regularizers": [{"type": "kl_ref", "lam": 0.5}] if flow else []}
    engine = Engine(load_recipe(recipe))
    stats = engine.fit()
    model = next(iter(engine.algo.modules.values()))
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters() if "lora" in n},
              f"{out}/{name}_lora.safetensors")
    keep = {k: float(v) for k, v in stats.items()
            if isinstance(v, (int, float)) and not k.startswith("perf/") and "time" not in k}
    json.dump(keep, open(f"{out}/{name}_stats.json", "w"))
    engine.close()
"""


def make_pipelines(folder: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.test_loop_flow import tiny_sd3_pipeline
    from tests.toy_pipelines import untrained_sd_pipeline

    untrained_sd_pipeline(seed=0).save_pretrained(str(folder / "tiny-sd"))
    tiny_sd3_pipeline().save_pretrained(str(folder / "tiny-sd3"))


def run_tree(tree: Path, out: Path, pipes: Path) -> None:
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, "-c", WORKER, str(tree), str(out), str(pipes)], check=True, env=env, cwd=tree)


def compare(a: Path, b: Path) -> list[str]:
    from safetensors.torch import load_file

    rows = []
    for name in ("sd", "sd3"):
        la, lb = load_file(a / f"{name}_lora.safetensors"), load_file(b / f"{name}_lora.safetensors")
        same = la.keys() == lb.keys() and all(bool((la[k] == lb[k]).all()) for k in la)
        sa, sb = json.loads((a / f"{name}_stats.json").read_text()), json.loads((b / f"{name}_stats.json").read_text())
        differ = sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k) and sa.get(k) == sa.get(k))
        verdict = "bit-identical" if same else "DIFFERENT"
        rows.append(f"| {name} | {len(la)} | {verdict} | {len(sa)} | {', '.join(differ) or 'none'} |")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rev", required=True, help="the commit to compare with (e.g. HEAD~1)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "parity.md"))
    args = p.parse_args()
    rev = subprocess.run(
        ["git", "rev-parse", "--short", args.rev], capture_output=True, text=True, cwd=ROOT, check=True
    )
    rev = rev.stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        other = tmp / "other"
        archive = subprocess.run(["git", "archive", rev], capture_output=True, cwd=ROOT, check=True).stdout
        other.mkdir()
        subprocess.run(["tar", "-x", "-C", str(other)], input=archive, check=True)
        pipes = tmp / "pipes"
        make_pipelines(pipes)
        run_tree(other, tmp / "a", pipes)
        run_tree(ROOT, tmp / "b", pipes)
        rows = compare(tmp / "a", tmp / "b")
    text = "\n".join(
        [
            f"# LOOP parity: this tree vs {rev}",
            "",
            "Command: `python benchmarks/parity.py --rev " + args.rev + "`. Two iterations of LOOP on tiny random-"
            "weight pipelines (DDIM: η 0.8, 2 epochs, evaluation at the end; SD3: SDE window [0, 3), kl_ref 0.5), "
            "the same recipe in both trees; LoRA tensors compared exactly, stats (all but perf/ and times) compared "
            "exactly.",
            "",
            "| path | LoRA tensors | final LoRA weights | stats | stats that differ |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    Path(args.out).write_text(text)
    print(text)
    return 0 if all("bit-identical" in r and r.endswith("none |") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
