"""rlprox command line: train | eval | recipes (thin: parse, call the API).

Bad input (recipe, override, checkpoint) prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_USAGE = 2


def _recipes_root() -> Path:
    """recipes/ of a source checkout (the package is installed editable from it)."""
    return Path(__file__).resolve().parent.parent / "recipes"


def cmd_train(args) -> int:
    from rlprox.engine import Engine
    from rlprox.recipe import load_recipe

    overrides = list(args.overrides)
    if args.resume:
        overrides.append("run.resume=auto")
    recipe = load_recipe(args.recipe, overrides)
    engine = Engine(recipe)
    try:
        stats = engine.fit()
    finally:
        engine.close()
    if engine.accelerator.is_main_process:
        tracker = engine.tracker
        summary = f"done: {recipe.run.name}, {engine.state.iteration} iterations"
        if "progress/env_steps" in stats:
            summary += f", {int(stats['progress/env_steps'])} env steps"
        shown = {k.split("/", 1)[1]: v for k, v in stats.items() if k.startswith("eval/") and not k.endswith(("_std", "episodes"))}
        if not shown and "reward/episodic_return" in stats:
            shown = {"training return": stats["reward/episodic_return"]}
        summary += "".join(f", {k} {v:.4g}" for k, v in shown.items())
        print(summary)
        print(f"checkpoint: {tracker.last_checkpoint}")
        print(f"metrics:    {tracker.metrics_path}")
        if getattr(tracker, "curve_path", None):
            print(f"curve:      {tracker.curve_path}")
    return 0


def cmd_eval(args) -> int:
    import importlib

    import torch
    from accelerate import Accelerator

    from rlprox import checkpoint
    from rlprox.recipe import ALGORITHMS

    path = Path(args.checkpoint)
    if path.is_dir() and not (path / "recipe.yaml").exists() and checkpoint.find_latest(path) is not None:
        path = checkpoint.find_latest(path)  # a run folder: take its newest checkpoint
    recipe = checkpoint.read_recipe(path, ["run.log_with=[]"])
    torch.set_num_threads(recipe.run.torch_threads)
    accelerator = Accelerator(cpu=recipe.run.cpu)
    algo = importlib.import_module(ALGORITHMS[recipe.algo][0]).build(recipe, accelerator, train=False)
    checkpoint.load_weights(path, algo.modules)
    rank = checkpoint.read_json(path / "rank-0.json")
    tensors = checkpoint.read_tensors(path / "rank-0.safetensors")
    algo.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("algo.")}, rank["algo"])
    deterministic = None if args.deterministic is None else args.deterministic
    stats = algo.evaluate(args.episodes, deterministic=deterministic, seed=args.seed)
    if hasattr(algo, "model_stats"):
        stats.update(algo.model_stats())
    if deterministic is None:
        deterministic = getattr(getattr(algo, "cfg", None), "eval_deterministic", True)
    result = {"checkpoint": str(path), "episodes": args.episodes, "deterministic": deterministic, **stats}
    if hasattr(algo, "last_eval"):
        result.update(algo.last_eval)
    (path / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = [("checkpoint", str(path)), ("episodes", f"{stats.get('eval/episodes', args.episodes)} ({'deterministic' if result['deterministic'] else 'stochastic'})")]
    if "eval/return" in stats:
        rows.append(("return", f"{stats['eval/return']:.2f} ± {stats['eval/return_std']:.2f}"))
        rows.append(("length", f"{stats['eval/length']:.1f}"))
    handled = ("eval/return", "eval/return_std", "eval/length", "eval/episodes")
    rows += [(k, f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in stats.items() if k not in handled]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(f"{'written':<{width}}  {path / 'eval.json'}")
    return 0


def cmd_recipes(args) -> int:
    from rlprox.recipe import list_recipes

    root = Path(args.root) if args.root else _recipes_root()
    if not root.is_dir():
        print(f"error: no recipes folder at {root}", file=sys.stderr)
        return EXIT_USAGE
    found = list_recipes(root)
    width = max((len(p) for p, _ in found), default=0)
    for path, description in found:
        print(f"{path:<{width}}  {description}")
    return 0


def cmd_rewards(args) -> int:
    from rlprox.rewards import list_rewards

    found = list_rewards()
    width = max((len(n) for n in found), default=0)
    for name, description in found.items():
        print(f"{name:<{width}}  {description}")
    print("custom rewards: \"module:function\" with fn(images, prompts, metadata) -> Tensor[B]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlprox", description="Policy-optimization training on one accelerate engine: PPO on gymnasium, structured-sparse training (algo: sparse), and the offline digits model zoo.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser("train", help="train from a YAML recipe", description="Train from a YAML recipe. Any field can be overridden: rlprox train RECIPE ppo.clip_coef=0.1 run.iterations=50")
    train.add_argument("recipe", help="path to a recipe YAML (see `rlprox recipes`)")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides (values are YAML)")
    train.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint of the run (same as run.resume=auto)")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a checkpoint", description="Rebuild the policy from the recipe stored in a checkpoint, run episodes, print mean ± std return and length, write eval.json next to it.")
    ev.add_argument("checkpoint", help="checkpoint folder (…/checkpoints/iter-000097) or a run folder (its newest checkpoint)")
    ev.add_argument("--episodes", type=int, default=10, help="number of episodes (default 10)")
    mode = ev.add_mutually_exclusive_group()
    mode.add_argument("--deterministic", dest="deterministic", action="store_true", default=None, help="take the mode of the policy (default: the recipe's ppo.eval_deterministic)")
    mode.add_argument("--stochastic", dest="deterministic", action="store_false", help="sample actions")
    ev.add_argument("--seed", type=int, default=None, help="evaluation seed (default: the recipe's seed)")
    ev.set_defaults(func=cmd_eval)

    rec = sub.add_parser("recipes", help="list recipes with one-line descriptions", description="List the YAML recipes shipped in recipes/.")
    rec.add_argument("--root", default=None, help="recipes folder (default: the project's recipes/)")
    rec.set_defaults(func=cmd_recipes)

    rew = sub.add_parser("rewards", help="list registered reward functions", description="List the registered reward functions (for the generative trainers).")
    rew.set_defaults(func=cmd_rewards)

    from rlprox.zoo.cli import add_zoo_parser

    add_zoo_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from rlprox.checkpoint import CheckpointError
    from rlprox.recipe import RecipeError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    if getattr(args, "episodes", 1) is not None and getattr(args, "episodes", 1) <= 0:
        print("error: --episodes must be > 0", file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except (RecipeError, CheckpointError) as err:
        print(str(err), file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as err:
        extra = {"diffusers": "zoo", "transformers": "zoo", "scipy": "zoo", "mujoco": "mujoco"}.get((err.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"error: this needs the optional package {err.name.split('.')[0]!r}: pip install 'rlprox[{extra}]'", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:
        if type(err).__name__ != "DependencyNotInstalled":  # gymnasium: e.g. MuJoCo envs without mujoco
            raise
        print(f"error: {str(err).splitlines()[0]} (pip install 'rlprox[mujoco]' for MuJoCo envs)", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
