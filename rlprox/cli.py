"""rlprox command line: train | eval | export | recipes | rewards | zoo (thin: parse, call the API).

Bad input (recipe, override, checkpoint) prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import NoReturn

EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad command-line input; one line, exit status 2."""


def _recipes_root() -> Path:
    """recipes/ of a source checkout (the package is installed editable from it)."""
    return Path(__file__).resolve().parent.parent / "recipes"


def help_recipe(section: str) -> int:
    """Print every field of a recipe section (run, optim, regularizers, or a trainer's section) with its doc."""
    from rlprox.algos import TRAINERS, trainer_spec
    from rlprox.prox.attach import ENTRY_KEYS, RENAMED
    from rlprox.recipe import OptimConfig, RunConfig, describe_recipe_section

    if section == "regularizers":
        print("regularizers: a list of entries, each a mapping; the regularizer's own keys (k, lam, ...) besides")
        width = max(map(len, ENTRY_KEYS))
        for key, doc in ENTRY_KEYS.items():
            print(f"    {key:<{width}}  {doc}")
        for old, new in RENAMED.items():
            print(f"    {old:<{width}}  deprecated, use {new}")
        return 0
    declared: dict[str, list[tuple[str, object]]] = {"run": [("", RunConfig)], "optim": [("", OptimConfig)]}
    for algo in TRAINERS.names():
        for name, cls in trainer_spec(algo).sections.items():
            seen = declared.setdefault(name, [])
            if all(cls is not other for _, other in seen):
                seen.append((algo, cls))
    if section not in declared:
        known = ", ".join([*declared, "regularizers"])
        raise UsageError(f"--help-recipe: unknown section {section!r}; known: {known}")
    for algo, cls in declared[section]:
        lines = describe_recipe_section(section, cls)
        if len(declared[section]) > 1:
            lines[0] += f" (algo {algo})"
        print("\n".join(lines))
    return 0


def cmd_train(args) -> int:
    from rlprox.engine import Engine
    from rlprox.recipe import load_recipe

    if args.help_recipe is not None:
        return help_recipe(args.help_recipe)
    if args.recipe is None:
        raise UsageError("the recipe is required (rlprox train RECIPE [key=value ...])")
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
        shown = {
            k.split("/", 1)[1]: v
            for k, v in stats.items()
            if k.startswith("eval/") and not k.endswith(("_std", "/count"))
        }
        if not shown and "reward/episodic_return" in stats:
            shown = {"training return": stats["reward/episodic_return"]}
        summary += "".join(f", {k} {v:.4g}" for k, v in shown.items())
        print(summary)
        print(f"checkpoint: {tracker.last_checkpoint}")
        print(f"metrics:    {tracker.metrics_path}")
        if getattr(tracker, "curve_path", None):
            print(f"curve:      {tracker.curve_path}")
    return 0


UNIT_FLAGS = {"episodes": "--episodes", "samples": "--num-samples", "examples": None}


def cmd_eval(args) -> int:
    from rlprox import checkpoint
    from rlprox.algos import trainer_spec
    from rlprox.engine import build_for_eval, hook, run_evaluation

    path = checkpoint.resolve_checkpoint(Path(args.checkpoint))
    saved_recipe = checkpoint.read_recipe(path)
    spec = trainer_spec(saved_recipe.algo)
    given = {"--episodes": args.episodes, "--num-samples": args.num_samples}
    wanted = UNIT_FLAGS[spec.eval_unit]
    for flag, value in given.items():
        if value is not None and flag != wanted:
            use = f"use {wanted}" if wanted else "it always evaluates its whole held-out set"
            raise UsageError(f"{flag} does not apply to algo {spec.name} (it evaluates {spec.eval_unit}; {use})")
    flags = (("--deterministic/--stochastic", "deterministic"), ("--prompts", "prompts"))
    for flag, name in (*flags, ("--guidance-scale", "guidance_scale")):
        if getattr(args, name) is not None and name not in spec.eval_flags:
            raise UsageError(f"{flag} does not apply to algo {spec.name}")
    scale = args.guidance_scale
    if scale is not None and not (math.isfinite(scale) and scale >= 0):
        raise UsageError(f"--guidance-scale must be a finite classifier-free guidance scale >= 0 (got {scale})")
    prompts = None
    if args.prompts is not None:
        from rlprox.prompts import read_prompt_file

        try:
            prompts = read_prompt_file(args.prompts)
        except ValueError as err:
            raise UsageError(f"--prompts: {err}") from None
    if args.video is not None:
        _check_video_args(args, spec)
    say = phase_lines(saved_recipe)
    say(f"loading {path} (algo {spec.name})")
    recipe, accelerator, _, algo = build_for_eval(path)
    if hook(algo, "evaluate") is None:
        raise UsageError(f"algo {spec.name} has no evaluate hook: its checkpoints cannot be evaluated")
    total = given.get(wanted) or recipe.run.eval_size or (len(prompts) if prompts else 10)
    if total <= 0:
        raise UsageError(f"{wanted}: must be > 0 (got {total})")
    seed = recipe.seed if args.seed is None else args.seed
    say(f"evaluating {total} {spec.eval_unit}")
    stats, values, images, info = run_evaluation(
        algo, accelerator, total, seed, args.deterministic, prompts, guidance_scale=args.guidance_scale
    )
    model_stats = hook(algo, "model_stats")
    extra = model_stats() if model_stats is not None else {}
    if accelerator.is_main_process:
        if args.video is not None:
            say(f"recording {args.video_episodes} video episode(s) to {args.video}")
        videos = _record_videos(args, algo, recipe, seed) if args.video is not None else []
        out = _new_eval_dir(path)
        written = []
        for name, batch in images.items():
            from rlprox.images import save_image_grid

            png = save_image_grid(batch, out / f"eval_{name.replace('/', '_')}.png", cols=info.get("grid_cols", 0))
            animated = [png.with_suffix(s) for s in (".gif", ".mp4")] if batch.ndim == 5 else []  # videos' grids
            written += [png, *(f for f in animated if f.is_file())]
        scalar_values = {
            k.lstrip("_"): v for k, v in values.items() if all(isinstance(x, (int, float, bool)) for x in v)
        }
        result = {
            "checkpoint": str(path),
            "algo": spec.name,
            "unit": spec.eval_unit,
            "seed": seed,
            **info,
            **stats,
            **extra,
            "values": scalar_values,
            "images": [str(p) for p in written],
        }
        if videos:
            result["videos"] = [{"path": str(p), "return": r} for p, r in videos]
        result.pop("grid_cols", None)
        (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        for file in [out / "eval.json", *written]:  # the checkpoint folder shows the latest evaluation
            _replace_with_copy(file, path / file.name)
        rows = [
            ("checkpoint", str(path)),
            (
                spec.eval_unit,
                str(int(stats.get("eval/count", 0)))
                + (
                    f" ({'deterministic' if info['deterministic'] else 'stochastic'})"
                    if "deterministic" in info
                    else ""
                ),
            ),
        ]
        for key in values:
            if f"eval/{key}" in stats and f"eval/{key}_std" in stats:
                rows.append((key, f"{stats[f'eval/{key}']:.4g} ± {stats[f'eval/{key}_std']:.3g}"))
        shown = {f"eval/{k}" for k in values} | {f"eval/{k}_std" for k in values} | {"eval/count"}
        rows += [(k.split("/", 1)[-1], _fmt(v)) for k, v in stats.items() if k not in shown]
        rows += [(k, _fmt(v)) for k, v in extra.items()]
        rows += [("image", str(p)) for p in written]
        rows += [("video", f"{p} (return {r:.4g})") for p, r in videos]
        width = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k:<{width}}  {v}")
        print(f"{'written':<{width}}  {out / 'eval.json'} (latest also in {path / 'eval.json'})")
    hook(algo, "close", lambda: None)()
    return 0


def _new_eval_dir(checkpoint_path: Path) -> Path:
    """``<checkpoint>/eval-001/``, ``eval-002/``, …: a folder no earlier evaluation wrote."""
    taken = [int(p.name[5:]) for p in checkpoint_path.glob("eval-*") if p.name[5:].isdigit()]
    number = max(taken, default=0) + 1
    while True:
        out = checkpoint_path / f"eval-{number:03d}"
        try:
            out.mkdir()
            return out
        except FileExistsError:  # another evaluation of this checkpoint took it meanwhile
            number += 1


def _replace_with_copy(source: Path, target: Path) -> None:
    import shutil

    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, tmp)
    tmp.replace(target)


def phase_lines(recipe):
    """``say(text)``: one line per phase of ``rlprox eval`` / ``export`` on stderr, shown
    where the training bar would be redrawn (``run.progress`` and stderr a terminal)."""
    from rlprox.tracking import shows_progress

    shown = shows_progress(recipe)
    return lambda text: print(f"{text} …", file=sys.stderr, flush=True) if shown else None


def _check_video_args(args, spec) -> None:
    import importlib.util

    if spec.eval_unit != "episodes":
        raise UsageError(f"--video records env episodes; algo {spec.name} evaluates {spec.eval_unit}")
    if args.video_episodes <= 0:
        raise UsageError(f"--video-episodes must be > 0 (got {args.video_episodes})")
    if importlib.util.find_spec("imageio") is None:
        raise UsageError("--video needs the optional package 'imageio': pip install 'rlprox[video]'")


def _record_videos(args, algo, recipe, seed: int) -> list:
    """Videos of the exported policy (what ``rlprox.load_policy`` gives) on the recipe's
    env, one per episode, from the seeds of the first evaluation episodes."""
    import tempfile

    import numpy as np

    from rlprox.engine import hook
    from rlprox.gymenv import eval_seed
    from rlprox.policy import is_policy_folder, load_policy
    from rlprox.video import VideoError, record_episodes

    export = hook(algo, "export")
    with tempfile.TemporaryDirectory() as tmp:
        if export is None or not (export(Path(tmp)) and is_policy_folder(tmp)):
            raise UsageError(f"--video: algo {recipe.algo} exports no policy folder (rlprox.load_policy)")
        policy = load_policy(tmp)
    deterministic = True if args.deterministic is None else args.deterministic  # greedy unless --stochastic
    rng = np.random.default_rng([seed, 20_000])
    memory = {}  # a recurrent policy's state, cleared at each episode's start

    def act(obs):
        obs = obs if policy.layout is not None else np.ravel(obs)  # images and Dicts keep their shape
        if not policy.recurrent:
            return policy.act(obs, deterministic=deterministic, rng=rng)
        action, memory["state"] = policy.act(obs, deterministic=deterministic, rng=rng, state=memory.get("state"))
        return action

    try:
        return record_episodes(
            recipe.env, act, args.video_episodes, eval_seed(seed), args.video, on_reset=memory.clear
        )
    except VideoError as err:
        raise UsageError(f"--video: {err}") from None
    except Exception as err:
        if type(err).__name__ != "DependencyNotInstalled":  # gymnasium: e.g. pygame for classic control
            raise
        raise UsageError(f"--video: {str(err).splitlines()[0]} (pip install 'rlprox[video]')") from None


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def cmd_export(args) -> int:
    from rlprox import checkpoint
    from rlprox.engine import build_for_eval, hook

    path = checkpoint.resolve_checkpoint(Path(args.checkpoint))
    say = phase_lines(checkpoint.read_recipe(path, scoring=False))  # an export scores nothing
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output folder {out} exists and is not a folder")
    say(f"loading {path}")
    recipe, accelerator, _, algo = build_for_eval(path, scoring=False)
    export = hook(algo, "export")
    if export is None:
        raise UsageError(f"algo {recipe.algo} has no export format; its checkpoint's model.safetensors is the model")
    if accelerator.is_main_process:
        from rlprox.policy import is_policy_folder

        say(f"exporting to {out}")
        for written in export(out):
            print(written)
        if is_policy_folder(out):
            print(f"load with: rlprox.load_policy({str(out)!r}).act(obs)")
    hook(algo, "close", lambda: None)()
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
    print('custom rewards: "module:function" with fn(images, prompts, metadata) -> Tensor[B]')
    return 0


def build_parser() -> argparse.ArgumentParser:
    from rlprox.algos import TRAINERS

    parser = argparse.ArgumentParser(
        prog="rlprox",
        description=(
            "Policy-optimization training on one accelerate engine. Trainers (recipe "
            f"`algo:`): {', '.join(TRAINERS.names())}. Also the offline digits model zoo."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train from a YAML recipe",
        description=(
            "Train from a YAML recipe. Any field can be overridden: "
            "rlprox train RECIPE ppo.clip_coef=0.1 run.iterations=50"
        ),
    )
    train.add_argument("recipe", nargs="?", help="path to a recipe YAML (see `rlprox recipes`)")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides (values are YAML)")
    train.add_argument(
        "--help-recipe",
        metavar="SECTION",
        default=None,
        help="print every field of a recipe section (run, optim, regularizers, env, ppo, loop, ...) with its doc",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint of the run (same as run.resume=auto)",
    )
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser(
        "eval",
        help="evaluate a checkpoint (any trainer)",
        description=(
            "Rebuild the trained model from the recipe stored in a checkpoint, evaluate it (sharded over "
            "processes under `accelerate launch`), print a table, write eval.json (and sample-grid PNGs for "
            "generative trainers) to a new folder eval-NNN/ in the checkpoint folder, the latest also copied "
            "next to the checkpoint. Which options apply depends on the checkpoint's trainer: env "
            "trainers (ppo, policyflow) take --episodes, --deterministic/--stochastic and --video; generative "
            "trainers take --num-samples and --prompts (vapi also --guidance-scale); sparse always uses its whole "
            "held-out split."
        ),
    )
    ev.add_argument(
        "checkpoint", help="checkpoint folder (…/checkpoints/iter-000097) or a run folder (its newest checkpoint)"
    )
    ev.add_argument(
        "--episodes",
        type=int,
        default=None,
        help="env trainers: number of episodes (default: the recipe's run.eval_size, else 10)",
    )
    ev.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="generative trainers: number of samples (default: the recipe's run.eval_size)",
    )
    ev.add_argument("--prompts", default=None, help="generative trainers: a text file with one prompt per line")
    ev.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        metavar="SCALE",
        help="vapi: classifier-free guidance scale of the evaluation samples, base and tuned (default: the recipe's)",
    )
    ev.add_argument("--cfg", type=float, default=None, dest="old_cfg", help=argparse.SUPPRESS)  # deprecated alias
    mode = ev.add_mutually_exclusive_group()
    mode.add_argument(
        "--deterministic",
        dest="deterministic",
        action="store_true",
        default=None,
        help="env trainers: take the mode of the policy (default: the recipe's setting)",
    )
    mode.add_argument("--stochastic", dest="deterministic", action="store_false", help="env trainers: sample actions")
    ev.add_argument("--seed", type=int, default=None, help="evaluation seed (default: the recipe's seed)")
    ev.add_argument(
        "--video",
        metavar="DIR",
        default=None,
        help=(
            "env trainers: also record episodes of the exported policy to DIR, greedy unless --stochastic (MP4 with "
            "imageio-ffmpeg, else GIF; pip install 'rlprox[video]'); they replay the first evaluation episodes' seeds"
        ),
    )
    ev.add_argument(
        "--video-episodes", type=int, default=2, metavar="N", help="with --video: episodes to record (default 2)"
    )
    ev.set_defaults(func=cmd_eval)

    ex = sub.add_parser(
        "export",
        help="export a checkpoint's model for use outside training",
        description=(
            "Write the trained model of a checkpoint in a self-contained format. ppo, policyflow: "
            "a policy folder (config.json + model.safetensors with the observation statistics) "
            "that rlprox.load_policy(OUT_DIR).act(obs) runs without gymnasium or a recipe; vapi: "
            "the GPT as config.json + model.safetensors and llamagen_gpt.pt in LlamaGen's "
            "checkpoint layout; loop: the LoRA adapter (diffusers format) or the whole pipeline."
        ),
    )
    ex.add_argument("checkpoint", help="checkpoint folder or run folder (its newest checkpoint)")
    ex.add_argument("out_dir", help="output folder (created; files of the same names are overwritten)")
    ex.set_defaults(func=cmd_export)

    rec = sub.add_parser(
        "recipes",
        help="list recipes with one-line descriptions",
        description="List the YAML recipes shipped in recipes/.",
    )
    rec.add_argument("--root", default=None, help="recipes folder (default: the project's recipes/)")
    rec.set_defaults(func=cmd_recipes)

    rew = sub.add_parser(
        "rewards",
        help="list registered reward functions",
        description="List the registered reward functions (for the generative trainers).",
    )
    rew.set_defaults(func=cmd_rewards)

    from rlprox.zoo.cli import add_zoo_parser

    add_zoo_parser(sub)
    return parser


def _error(message: str) -> int:
    """Print a one-line error as the last thing on the terminal: progress bars still
    open (a run stopped mid-iteration) are closed first, so none redraws after it."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()
    print(message, file=sys.stderr, flush=True)
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    if getattr(args, "old_cfg", None) is not None:
        print(
            "rlprox eval: --cfg is deprecated, use --guidance-scale (the old flag goes in the next release)",
            file=sys.stderr,
        )
        if args.guidance_scale is not None:
            print("error: give --guidance-scale only (--cfg is its deprecated name)", file=sys.stderr)
            return EXIT_USAGE
        args.guidance_scale = args.old_cfg
    for flag in ("episodes", "num_samples"):
        value = getattr(args, flag, None)
        if value is not None and value <= 0:
            print(f"error: --{flag.replace('_', '-')} must be > 0", file=sys.stderr)
            return EXIT_USAGE
    try:
        return _run(args)
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """A process started by torchrun or accelerate leaves its process group before the
    interpreter exits (every command, ``eval`` and ``export`` included)."""
    dist = sys.modules.get("torch.distributed")  # never import torch just for this
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def entry() -> None:
    """The ``rlprox`` command and ``python -m rlprox``."""
    exit_process(main())


def exit_process(code: int) -> NoReturn:
    """End this process with ``code``. One process of several (``WORLD_SIZE`` > 1, as
    torchrun and accelerate set it) ends without the interpreter's teardown, once its
    ``atexit`` handlers have run and its output is flushed: leaving the process group
    does not free it while FSDP's device mesh stays referenced from torch's DTensor
    caches, and its gloo threads, destroyed during teardown, now and then abort a run
    whose work is done ("terminate called without an active exception", exit -6), which
    torchrun reports as the run failing. Scripts of their own that run the engine under
    torchrun end with it too."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _run(args) -> int:
    from rlprox.checkpoint import CheckpointError
    from rlprox.errors import RecipeError, RewardError

    try:
        return args.func(args)
    except (RecipeError, CheckpointError) as err:
        return _error(str(err))
    except UsageError as err:
        return _error(f"error: {err}")
    except RewardError as err:
        return _error(f"reward error: {err}")
    except ModuleNotFoundError as err:
        extra = {
            "diffusers": "diffusion",
            "transformers": "diffusion",
            "peft": "diffusion",
            "mujoco": "mujoco",
            "gymnasium_robotics": "robotics",
            "imageio": "video",
            "pygame": "video",
        }.get((err.name or "").split(".")[0])
        if extra is None:
            raise
        return _error(
            f"error: this needs the optional package {err.name.split('.')[0]!r}: pip install 'rlprox[{extra}]'"
        )
    except Exception as err:
        if type(err).__name__ != "DependencyNotInstalled":  # gymnasium: e.g. MuJoCo envs without mujoco
            raise
        return _error(f"error: {str(err).splitlines()[0]} (pip install 'rlprox[mujoco]' for MuJoCo envs)")
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
