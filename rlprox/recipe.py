"""YAML recipe -> typed dataclasses, dotted CLI overrides, validation.

A recipe is one experiment in one file (shape in DESIGN.md). Everything is checked
before any work starts; a bad value raises ``RecipeError`` whose message is one line,
``recipe error: <key>: <what is wrong>``, and the CLI exits with status 2.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib
import importlib.util
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class RecipeError(ValueError):
    """A recipe problem the user can fix; ``str(err)`` is the one-line message."""

    def __init__(self, key: str, problem: str):
        self.key, self.problem = key, problem
        super().__init__(f"recipe error: {key}: {problem}")


# ----------------------------------------------------------------------------- sections


@dataclass
class RunConfig:
    """Where and how long a run goes. Iteration = one collect + one update."""

    name: str = "run"  # run folder name under output_dir
    output_dir: str = "runs"  # parent folder of the run folder
    iterations: int = 10  # collect/update iterations (PPO env steps = iterations × num_envs × num_steps × processes)
    eval_every: int = 0  # evaluate every N iterations (0: only at the end when eval_episodes > 0)
    eval_episodes: int = 0  # episodes (or samples) per evaluation; 0 disables evaluation during training
    save_every: int = 0  # checkpoint every N iterations (0: only at the end)
    keep_last: int = 3  # keep the newest N checkpoints
    resume: str = "never"  # "never" | "auto" (newest complete checkpoint in the run folder) | path to a checkpoint
    overwrite: bool = False  # start fresh in a run folder that already holds a run, deleting it (otherwise that is an error)
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])  # accelerate trackers: tensorboard, wandb, ...; [] for none
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # autocast for the loss, via accelerate
    gradient_accumulation_steps: int = 1  # minibatches accumulated per optimizer step
    cpu: bool = False  # force CPU even when a GPU is present
    torch_threads: int = 1  # intra-op threads; 1 is fastest for small policies on shared CPUs
    progress: bool = True  # progress bar on stderr
    plot: bool = True  # write the learning-curve PNG at the end


@dataclass
class OptimConfig:
    """The optimizer; lr schedule over iterations."""

    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 3e-4
    eps: float = 1e-5  # Adam epsilon (CleanRL/SB3 PPO use 1e-5)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    momentum: float = 0.0  # SGD only
    schedule: Literal["constant", "linear", "cosine"] = "constant"  # "linear": anneal to 0 over the run (PPO's lr annealing)
    max_grad_norm: float = 0.5  # global grad-norm clip; 0 disables


@dataclass
class EnvConfig:
    """A gymnasium vector env. Each process steps its own ``num_envs`` copies."""

    id: str = "CartPole-v1"  # gymnasium id, or "module:Class" / "module:function" returning an Env
    num_envs: int = 8  # envs per process
    vectorization: Literal["sync", "async"] = "sync"
    kwargs: dict = field(default_factory=dict)  # passed to gym.make / the class
    wrappers: list[str] = field(default_factory=list)  # "module:Class" wrappers applied to each env, in order
    max_episode_steps: int = 0  # 0: the env's own limit
    normalize_obs: bool = False  # running mean/std observation normalisation (saved in checkpoints)
    normalize_reward: bool = False  # scale rewards by the running std of the discounted return
    clip_obs: float = 10.0  # clip normalised observations to ±clip_obs
    clip_reward: float = 10.0  # clip normalised rewards to ±clip_reward


# Trainer sections are imported from their own files; recipe.py only names them.
from rlprox.algos.ppo import PPOConfig  # noqa: E402
from rlprox.algos.sparse import SparseConfig  # noqa: E402

ALGORITHMS = {
    # algo name -> (module with build(recipe, accelerator) -> Algorithm, required sections)
    "ppo": ("rlprox.algos.ppo", ("env", "ppo")),
    "sparse": ("rlprox.algos.sparse", ("sparse",)),
}


@dataclass
class Recipe:
    """The whole experiment."""

    algo: str = "ppo"  # ppo | sparse
    seed: int = 1
    description: str = ""  # one line, shown by `rlprox recipes`
    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    env: EnvConfig | None = None
    ppo: PPOConfig | None = None
    sparse: SparseConfig | None = None
    regularizers: list[dict] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- parsing


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except RecipeError as err:
                errors.append(err)
        raise errors[0] if errors else RecipeError(key, f"unexpected value {value!r}")
    if origin is Literal:
        options = typing.get_args(tp)
        if isinstance(value, bool) and ("no" if not value else "yes") in options:
            value = "no" if not value else "yes"  # YAML 1.1 reads a bare `no` as false
        if value not in options:
            raise RecipeError(key, f"must be one of {', '.join(map(str, options))} (got {value!r})")
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise RecipeError(key, f"expected a mapping (got {type(value).__name__})")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(key, f"expected a list (got {type(value).__name__} {value!r})")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise RecipeError(key, f"expected a mapping (got {type(value).__name__})")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(key, f"expected true/false (got {value!r})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(key, f"expected an integer (got {value!r})")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise RecipeError(key, f"expected a number (got {value!r})")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # PyYAML reads "3e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(key, f"expected a number (got {value!r})")
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(key, f"expected a string (got {value!r})")
        return value
    return value  # Any


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise RecipeError(full, f"unknown key{_did_you_mean(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"ppo.clip_coef=0.1"`` -> (["ppo", "clip_coef"], 0.1); the value is YAML."""
    if "=" not in text:
        raise RecipeError(text, "override must look like key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(".".join(path[: i + 1]), "is not a section; cannot set a sub-key")
            node = child
        node[path[-1]] = value
    return data


def load_recipe(source: str | os.PathLike | dict, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML file (or a dict), apply ``key.sub=value`` overrides, validate."""
    if isinstance(source, dict):
        data = copy.deepcopy(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise RecipeError(str(path), "recipe file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise RecipeError(str(path), f"not valid YAML{where}") from None
        if not isinstance(data, dict):
            raise RecipeError(str(path), "a recipe must be a YAML mapping")
    data = apply_overrides(data, overrides or [])
    algo = data.get("algo", "ppo")
    if algo not in ALGORITHMS:
        raise RecipeError("algo", f"unknown algorithm {algo!r}{_did_you_mean(str(algo), ALGORITHMS)}; known: {', '.join(ALGORITHMS)}")
    for section in ALGORITHMS[algo][1]:
        data.setdefault(section, {})
    recipe = _build(Recipe, data)
    validate(recipe)
    return recipe


# ----------------------------------------------------------------------------- validation


def _positive(key: str, value, allow_zero: bool = False):
    if value < 0 or (value == 0 and not allow_zero):
        raise RecipeError(key, f"must be {'>= 0' if allow_zero else '> 0'} (got {value})")


def resolve_object(spec: str, key: str):
    """Import ``"module:attr"``; a failure is a RecipeError naming ``key``."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise RecipeError(key, f"expected 'module:Name' (got {spec!r})")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RecipeError(key, f"cannot import module {module_name!r} ({err})") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise RecipeError(key, f"module {module_name!r} has no attribute {attr!r}") from None


def validate(recipe: Recipe) -> None:
    """Cross-field checks that types alone cannot express."""
    run = recipe.run
    _positive("run.iterations", run.iterations)
    _positive("run.eval_every", run.eval_every, allow_zero=True)
    _positive("run.eval_episodes", run.eval_episodes, allow_zero=True)
    _positive("run.save_every", run.save_every, allow_zero=True)
    _positive("run.keep_last", run.keep_last)
    _positive("run.gradient_accumulation_steps", run.gradient_accumulation_steps)
    _positive("run.torch_threads", run.torch_threads)
    if run.resume not in ("never", "auto") and not Path(run.resume).exists():
        raise RecipeError("run.resume", f"checkpoint not found: {run.resume}")
    for tracker in run.log_with:
        if tracker in ("wandb", "comet_ml", "mlflow", "clearml", "aim", "dvclive", "swanlab", "trackio"):
            if importlib.util.find_spec(tracker) is None:
                raise RecipeError("run.log_with", f"tracker {tracker!r} is not installed (pip install {tracker.replace('_', '-')})")
        elif tracker not in ("tensorboard", "all"):
            raise RecipeError("run.log_with", f"unknown tracker {tracker!r}; use tensorboard, wandb, comet_ml, mlflow, ...")
    optim = recipe.optim
    _positive("optim.lr", optim.lr)
    _positive("optim.max_grad_norm", optim.max_grad_norm, allow_zero=True)
    if len(optim.betas) != 2 or not all(0 <= b < 1 for b in optim.betas):
        raise RecipeError("optim.betas", f"expected two numbers in [0, 1) (got {optim.betas})")
    if recipe.regularizers:
        from rlprox.prox.attach import parse_spec

        for i, spec in enumerate(recipe.regularizers):
            parse_spec(spec, i)
    if recipe.env is not None:
        validate_env(recipe.env)
    module = importlib.import_module(ALGORITHMS[recipe.algo][0])
    module.validate(recipe)


def validate_env(env: EnvConfig) -> None:
    _positive("env.num_envs", env.num_envs)
    _positive("env.max_episode_steps", env.max_episode_steps, allow_zero=True)
    if ":" in env.id:
        resolve_object(env.id, "env.id")
    else:
        import gymnasium as gym

        import rlprox.envs  # noqa: F401  registers the rlprox/ namespace

        if env.id not in gym.registry:
            raise RecipeError("env.id", f"unknown gymnasium env {env.id!r}{_did_you_mean(env.id, gym.registry.keys())}")
    for i, wrapper in enumerate(env.wrappers):
        resolve_object(wrapper, f"env.wrappers[{i}]")


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


def list_recipes(root: str | os.PathLike) -> list[tuple[str, str]]:
    """(relative path, description) for every YAML recipe under ``root``."""
    root = Path(root)
    out = []
    for path in sorted(root.rglob("*.yaml")):
        if "accelerate" in path.relative_to(root).parts:
            continue
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError:
            data = {}
        out.append((str(path.relative_to(root.parent) if root.name == "recipes" else path), str(data.get("description", ""))))
    return out
