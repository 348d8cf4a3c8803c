"""YAML recipe -> typed dataclasses, dotted CLI overrides, validation.

A recipe is one experiment in one file:

    algo: ppo                    # a registered trainer (rlprox.algos)
    seed: 1
    run: {...}                   # RunConfig: where, how long, precision, tracking
    optim: {...}                 # OptimConfig
    regularizers: [...]          # rlprox.prox, attached by parameter-name globs
    env: {...}  ppo: {...}       # the trainer's own sections (declared by the trainer)

A section's dataclass may rename a field: ``RENAMED = {"old": "new"}`` (a ``ClassVar``;
the new name may be a dotted path into a ``dict`` field of the same section, e.g.
``{"eta": "sampling.eta"}``). The old key, in the YAML or an override, still works for
one release: it is moved to its new place and one stderr line names the new key; giving
both is an error. ``Recipe.to_dict`` (the recipe saved in checkpoints) holds only new keys.

Everything is checked before any work starts; a bad value raises ``RecipeError``
whose message is one line, ``recipe error: <key>: <what is wrong>``, and the CLI
exits with status 2. This module imports no trainer: the trainer named by ``algo``
is looked up in the trainer registry, which imports only that trainer's module.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.util
import inspect
import io
import os
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from rlprox.errors import RecipeError, did_you_mean, move_renamed, warn_renamed

__all__ = [
    "RecipeError",
    "RunConfig",
    "OptimConfig",
    "DDPConfig",
    "Recipe",
    "load_recipe",
    "dump_recipe",
    "parse_section",
    "list_recipes",
    "field_docs",
    "describe_section",
]


# ----------------------------------------------------------------------------- sections


@dataclass
class DDPConfig:
    """torch DistributedDataParallel options, used when ``run.grad_sync: ddp``."""

    find_unused_parameters: bool = False  # tolerate trained parameters that get no gradient in some step
    bucket_cap_mb: int = 25  # gradient bucket size
    static_graph: bool = False  # the same parameters are used in every step
    gradient_as_bucket_view: bool = False  # grads are views into the buckets (saves memory)


@dataclass
class FSDPConfig:
    """Parameter sharding (torch FSDP2), used when ``run.grad_sync: fsdp``."""

    # class names of submodules sharded as their own units (e.g.
    # transformer blocks); the rest of each trained module is one unit
    wrap: list[str] = field(default_factory=list)
    reshard_after_forward: bool = (
        True  # free gathered parameters after each unit's forward (less memory, one more all-gather in backward)
    )


@dataclass
class RunConfig:
    """Where and how long a run goes, and how it runs. Iteration = one collect + one update."""

    name: str = "run"  # run folder name under output_dir
    output_dir: str = "runs"  # parent folder of the run folder
    iterations: int = 10  # collect/update iterations (PPO env steps = iterations × num_envs × num_steps × processes)
    stop_after: int = 0  # stop after N iterations, schedules still over run.iterations (0: run them all)
    eval_every: int = 0  # evaluate every N iterations (0: only at the end, when eval_size > 0)
    # episodes (env trainers) or samples (generative trainers) per
    # evaluation, over all processes; 0 disables evaluation during training
    eval_size: int = 0
    save_every: int = 0  # checkpoint every N iterations (0: only at the end)
    keep_last: int = 3  # keep the newest N checkpoints
    resume: str = "never"  # "never" | "auto" (newest complete checkpoint in the run folder) | path to a checkpoint
    overwrite: bool = (
        False  # start fresh in a run folder that already holds a run, deleting it (otherwise that is an error)
    )
    log_with: list[str] = field(
        default_factory=lambda: ["tensorboard"]
    )  # accelerate trackers: tensorboard, wandb, ...; [] for none
    mixed_precision: Literal["no", "fp16", "bf16"] = (
        "no"  # autocast for collect's and the loss's forward passes, via accelerate
    )
    # dtype of frozen modules and of the frozen (non-trained) parameters of trained ones, e.g. a LoRA base
    frozen_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_accumulation_steps: int = 1  # minibatches accumulated per optimizer step
    # how processes share the trained modules: shm (shared memory, processes on one x86-64 CPU host),
    # allreduce (one flat all-reduce per optimizer step), ddp (torch DDP); auto = shm where it applies, else
    # allreduce; fsdp shards parameters, gradients and optimizer state over the processes (torch FSDP2)
    grad_sync: Literal["auto", "shm", "allreduce", "ddp", "fsdp"] = "auto"
    ddp: DDPConfig = field(default_factory=DDPConfig)  # options for grad_sync: ddp
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)  # options for grad_sync: fsdp
    cpu: bool = False  # force CPU even when a GPU is present
    torch_threads: int = 1  # intra-op threads; 1 is fastest for small policies on shared CPUs
    # torch.compile the rollout's torch forward and the update's loss (ppo only), for GPUs; the first iteration
    # pays the compilation; the modules are not wrapped, so checkpoints and exports are as without it
    compile: bool = False
    progress: bool = True  # progress bar on stderr
    plot: bool = True  # write the learning-curve PNG at the end
    # log optim/update_norm, the step size ‖θ_after − θ_before‖₂ over the trained weights of each optimizer step
    # (the iteration's mean over its steps); keeps one copy of the trained weights
    log_update_norm: bool = False


@dataclass
class OptimConfig:
    """The optimizer; lr schedule over iterations."""

    RENAMED: ClassVar[dict[str, str]] = {"schedule": "lr_schedule"}

    name: Literal["adam", "adamw", "sgd"] = "adam"  # torch.optim.Adam, AdamW or SGD
    lr: float = 3e-4  # base learning rate (a trainer's parameter groups may scale it per group)
    eps: float = 1e-5  # Adam epsilon (CleanRL/SB3 PPO use 1e-5)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam (β₁, β₂)
    weight_decay: float = (
        0.0  # decoupled under adamw; never applied to biases, norm weights or embeddings unless decay_all
    )
    decay_all: bool = False  # apply weight_decay to every parameter, biases and norms included
    momentum: float = 0.0  # SGD only
    # the lr schedule over iterations: "linear" anneals to 0 over the run (PPO's lr annealing), "cosine" to 0 on
    # a half cosine
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_iterations: int = 0  # linear lr warm-up from 0 over the first N iterations, then lr_schedule
    max_grad_norm: float = 0.5  # global grad-norm clip; 0 disables


ENGINE_SECTIONS = ("algo", "seed", "description", "run", "optim", "regularizers")


@dataclass
class Recipe:
    """The whole experiment. The trainer's own sections (``env``, ``ppo``, ...) live in
    ``sections`` and read as attributes: ``recipe.ppo.clip_coef``."""

    algo: str
    seed: int = 1
    description: str = ""  # one line, shown by `rlprox recipes`
    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    regularizers: list[dict] = field(default_factory=list)
    sections: dict[str, Any] = field(default_factory=dict)
    # what the trainer's validate resolved from the sections without loading weights (e.g. LOOP's
    # pipeline family, options, reward and prompts), set by load_recipe; its build starts from it
    setup: Any = field(default=None, repr=False, compare=False)

    def __getattr__(self, name: str):
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(
            f"recipe has no section {name!r} (algo {self.__dict__.get('algo')!r} "
            f"declares: {', '.join(sections) or 'none'})"
        )

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def to_dict(self) -> dict:
        out = {k: copy.deepcopy(getattr(self, k)) for k in ENGINE_SECTIONS}
        out["run"] = dataclasses.asdict(self.run)
        out["optim"] = dataclasses.asdict(self.optim)
        for name, value in self.sections.items():
            out[name] = _plain(value)
        return out


def _plain(value: Any) -> Any:
    """A section's value as YAML can write it: dataclasses as mappings, in lists too (a list of reward terms)."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return copy.deepcopy(value)


# ----------------------------------------------------------------------------- parsing


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise RecipeError(key, "is required")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except RecipeError as err:
                errors.append((arg, err))
        # a mapping's error is the dataclass arm's (it names the field), a list's the list arm's
        fitting = [err for arg, err in errors if _same_shape(value, arg)] + [err for _, err in errors]
        raise fitting[0] if fitting else RecipeError(key, f"unexpected value {value!r}")
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
        return parse_section(tp, value, key)
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


def _same_shape(value: Any, tp: Any) -> bool:
    """``value`` is a mapping and ``tp`` a dataclass, or both are lists."""
    if isinstance(value, dict):
        return dataclasses.is_dataclass(tp)
    return isinstance(value, list) and typing.get_origin(tp) is list


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def renamed_keys(cls) -> dict[str, str]:
    """The ``RENAMED`` table of a section dataclass: old key -> new key (dotted into a dict field)."""
    return dict(getattr(cls, "RENAMED", None) or {})


def _nested_sections(cls) -> dict[str, type]:
    """Fields of ``cls`` that are themselves section dataclasses (``run.ddp``, ``loop.lora``)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def rename_path(cls, path: list[str], prefix: str) -> list[str]:
    """An override's key path inside section ``cls`` with deprecated names replaced (one stderr line each)."""
    out, i = [], 0
    while i < len(path):
        part, renamed = path[i], renamed_keys(cls)
        if part in renamed:
            new = renamed[part].split(".")
            warn_renamed(_join(prefix, ".".join(out + [part])), _join(prefix, ".".join(out + new)))
            return out + new + path[i + 1 :]
        out.append(part)
        cls = _nested_sections(cls).get(part) if cls is not None else None
        if cls is None:
            return out + path[i + 1 :]
        i += 1
    return out


def upgrade_section(cls, data: dict, prefix: str = "") -> dict:
    """``data`` with the deprecated keys of ``cls`` (and of its nested sections) moved to their new
    names, one stderr line for each; giving an old key and its new one is a RecipeError."""
    data = move_renamed(data, renamed_keys(cls), prefix)
    for name, sub in _nested_sections(cls).items():
        if isinstance(data.get(name), dict):
            data[name] = upgrade_section(sub, data[name], _join(prefix, name))
    return data


def parse_section(cls, data: dict, prefix: str = ""):
    """Build the dataclass ``cls`` from a mapping, checking every key and type."""
    data = upgrade_section(cls, data, prefix)
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = {f.name for f in fields}
    for f in fields:
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data:
            raise RecipeError(_join(prefix, f.name), "is required")
    kwargs = {}
    for key, value in data.items():
        full = _join(prefix, key)
        if key not in names:
            raise RecipeError(full, f"unknown key{did_you_mean(str(key), names | set(renamed_keys(cls)))}")
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


def apply_overrides(data: dict, overrides: list[str], sections: dict[str, type] | None = None) -> dict:
    """``data`` with each ``key.sub=value`` set; ``sections`` (name -> dataclass) renames deprecated keys."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        if sections and len(path) > 1 and path[0] in sections:
            path = [path[0], *rename_path(sections[path[0]], path[1:], path[0])]
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


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise RecipeError(str(path), "recipe file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RecipeError(str(path), f"not valid YAML{where}") from None
    if data is None:
        raise RecipeError(
            str(path), "the recipe file is empty (a recipe needs at least `algo:`; see `rlprox recipes`)"
        )
    if not isinstance(data, dict):
        raise RecipeError(str(path), "a recipe must be a YAML mapping")
    return data


def load_recipe(source: str | os.PathLike | dict, overrides: list[str] | None = None, scoring: bool = True) -> Recipe:
    """Read a YAML file (or a dict), apply ``key.sub=value`` overrides, validate. ``scoring``
    False (``rlprox export``): what only scoring needs (a reward plugin) is not checked."""
    from rlprox.algos import TRAINERS, trainer_spec

    data = copy.deepcopy(source) if isinstance(source, dict) else _read_yaml(Path(source))
    overrides = list(overrides or [])
    algo = data.get("algo")
    for text in overrides:  # an override may name the trainer; its sections decide what is renamed
        path, value = parse_override(text)
        if path == ["algo"]:
            algo = value
    if algo is None:
        raise RecipeError("algo", f"missing; one of: {', '.join(TRAINERS.names())}")
    spec = trainer_spec(algo)
    classes = {
        k: v
        for k, v in {"run": RunConfig, "optim": OptimConfig, **spec.sections}.items()
        if dataclasses.is_dataclass(v)
    }
    # the file's deprecated keys first, so that an override (old key or new) replaces the file's value
    data = {
        k: upgrade_section(classes[k], v, k) if k in classes and isinstance(v, dict) else v for k, v in data.items()
    }
    data = apply_overrides(data, overrides, classes)
    known = set(ENGINE_SECTIONS) | set(spec.sections)
    for key in data:
        if key not in known:
            raise RecipeError(
                str(key),
                f"unknown key{did_you_mean(str(key), known)} (algo {spec.name} takes: {', '.join(sorted(known))})",
            )
    engine_part = {k: v for k, v in data.items() if k in ENGINE_SECTIONS}
    recipe = Recipe(
        algo=data["algo"],
        seed=_coerce(engine_part.get("seed", 1), int, "seed"),
        description=_coerce(engine_part.get("description", ""), str, "description"),
        run=_coerce(engine_part.get("run"), RunConfig, "run"),
        optim=_coerce(engine_part.get("optim"), OptimConfig, "optim"),
        regularizers=_upgrade_regularizers(_coerce(engine_part.get("regularizers") or [], list[dict], "regularizers")),
        sections={name: _coerce(data.get(name), cls, name) for name, cls in spec.sections.items()},
    )
    recipe.setup = validate(recipe, spec, scoring)
    return recipe


def _upgrade_regularizers(entries: list[dict]) -> list[dict]:
    from rlprox.prox.attach import upgrade_entry

    return [upgrade_entry(entry, i) if isinstance(entry, dict) else entry for i, entry in enumerate(entries)]


# ----------------------------------------------------------------------------- validation


def positive(key: str, value, allow_zero: bool = False):
    """RecipeError unless ``value`` > 0 (or >= 0)."""
    if value < 0 or (value == 0 and not allow_zero):
        raise RecipeError(key, f"must be {'>= 0' if allow_zero else '> 0'} (got {value})")


KNOWN_TRACKERS = ("wandb", "comet_ml", "mlflow", "clearml", "aim", "dvclive", "swanlab", "trackio")


def validate(recipe: Recipe, spec=None, scoring: bool = True) -> Any:
    """Cross-field checks that types alone cannot express; then the trainer's own, whose
    result (what it resolved, or None) is returned. A trainer's validate that takes a
    ``scoring`` argument gets it (False: skip what only scoring needs)."""
    from rlprox.algos import trainer_spec

    run = recipe.run
    positive("run.iterations", run.iterations)
    positive("run.stop_after", run.stop_after, allow_zero=True)
    if run.stop_after > run.iterations:
        raise RecipeError("run.stop_after", f"must be <= run.iterations = {run.iterations} (got {run.stop_after})")
    positive("run.eval_every", run.eval_every, allow_zero=True)
    positive("run.eval_size", run.eval_size, allow_zero=True)
    positive("run.save_every", run.save_every, allow_zero=True)
    positive("run.keep_last", run.keep_last)
    positive("run.gradient_accumulation_steps", run.gradient_accumulation_steps)
    positive("run.torch_threads", run.torch_threads)
    positive("run.ddp.bucket_cap_mb", run.ddp.bucket_cap_mb)
    if run.grad_sync == "fsdp" and run.mixed_precision == "fp16":
        raise RecipeError(
            "run.mixed_precision", "fp16 loss scaling is not supported with run.grad_sync: fsdp; use bf16"
        )
    if run.compile and run.grad_sync == "fsdp":
        raise RecipeError("run.compile", "not supported with run.grad_sync: fsdp")
    if run.log_update_norm and run.grad_sync == "fsdp":
        raise RecipeError("run.log_update_norm", "not supported with run.grad_sync: fsdp (sharded weights)")
    if run.resume not in ("never", "auto") and not Path(run.resume).exists():
        raise RecipeError("run.resume", f"checkpoint not found: {run.resume}")
    for folder in (recipe.run_dir, *recipe.run_dir.parents):  # the nearest one that exists must be a folder
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                output_dir = Path(run.output_dir)
                key = "run.output_dir" if folder in (output_dir, *output_dir.parents) else "run.name"
                raise RecipeError(key, f"{folder} exists and is not a folder")
            break
    for tracker in run.log_with:
        if tracker in KNOWN_TRACKERS:
            if importlib.util.find_spec(tracker) is None:
                raise RecipeError(
                    "run.log_with", f"tracker {tracker!r} is not installed (pip install {tracker.replace('_', '-')})"
                )
        elif tracker not in ("tensorboard", "all"):
            raise RecipeError(
                "run.log_with", f"unknown tracker {tracker!r}; use tensorboard, wandb, comet_ml, mlflow, ..."
            )
    optim = recipe.optim
    positive("optim.lr", optim.lr)
    positive("optim.eps", optim.eps)
    positive("optim.max_grad_norm", optim.max_grad_norm, allow_zero=True)
    positive("optim.weight_decay", optim.weight_decay, allow_zero=True)
    positive("optim.warmup_iterations", optim.warmup_iterations, allow_zero=True)
    if len(optim.betas) != 2 or not all(0 <= b < 1 for b in optim.betas):
        raise RecipeError("optim.betas", f"expected two numbers in [0, 1) (got {optim.betas})")
    spec = spec or trainer_spec(recipe.algo)
    if run.compile and not spec.compiles:
        raise RecipeError("run.compile", f"algo {spec.name} does not support it (trainers that do: ppo)")
    if recipe.regularizers:
        from rlprox.prox.attach import parse_spec

        for i, entry in enumerate(recipe.regularizers):
            reg, _, mode = parse_spec(entry, i)
            if mode == "loss" and reg.usable_inputs(spec.loss_inputs) is None:
                offered = f"it offers {', '.join(spec.loss_inputs)}" if spec.loss_inputs else "it offers none"
                needed = " or ".join(
                    ", ".join(k for k in names if k not in spec.loss_inputs) for names in reg.input_sets()
                )
                raise RecipeError(
                    f"regularizers[{i}]",
                    f"{entry['type']} needs {needed} from the loss, "
                    f"which algo {spec.name} does not provide ({offered})",
                )
    for key in spec.counts:
        section, name = key.split(".", 1)
        positive(key, getattr(recipe.sections[section], name))
    setup = None
    if spec.validate is not None:
        takes_scoring = "scoring" in inspect.signature(spec.validate).parameters
        setup = spec.validate(recipe, scoring=scoring) if takes_scoring else spec.validate(recipe)
    if spec.minibatches_per_epoch is not None:
        steps, per_epoch = run.gradient_accumulation_steps, spec.minibatches_per_epoch(recipe)
        if per_epoch % steps:
            raise RecipeError(
                "run.gradient_accumulation_steps",
                f"{steps} does not divide the {per_epoch} minibatch{'es' if per_epoch != 1 else ''} per epoch"
                " (an optimizer step would span epochs)",
            )
    return setup


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
        out.append(
            (str(path.relative_to(root.parent) if root.name == "recipes" else path), str(data.get("description", "")))
        )
    return out


# ----------------------------------------------------------------------------- field docs


def _class_field_docs(cls) -> dict[str, str]:
    """The comments of the fields ``cls`` itself declares: the comment block right above a field and the
    comments on its own lines (a trailing ``# ...``), joined in source order."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, tuple[str, bool]] = {}  # line -> (text, whole line)
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and not tok.string.lstrip("# ").startswith(("noqa", "type:", "pragma")):
            row = tok.start[0]
            comments[row] = (tok.string.lstrip("#").strip(), not lines[row - 1][: tok.start[1]].strip())
    (node,) = ast.parse(source).body
    docs, previous_end = {}, node.lineno
    for stmt in node.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            above = [
                text for row, (text, whole) in sorted(comments.items()) if previous_end < row < stmt.lineno and whole
            ]
            own = [text for row, (text, _) in sorted(comments.items()) if stmt.lineno <= row <= stmt.end_lineno]
            docs[stmt.target.id] = " ".join(t for t in above + own if t)
        previous_end = stmt.end_lineno
    return docs


def field_docs(cls) -> dict[str, str]:
    """Field name -> its doc, read from the comments in the source of ``cls`` and its dataclass bases
    (the convention of every config dataclass: a comment block above a field and/or a trailing comment)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update({k: v for k, v in _class_field_docs(klass).items() if v or k not in docs})
    for name, sub in _nested_sections(cls).items():  # an uncommented nested section: its class docstring
        if not docs.get(name) and sub.__doc__ and not sub.__doc__.startswith(f"{sub.__name__}("):
            docs[name] = " ".join(sub.__doc__.split())
    return {f.name: docs.get(f.name, "") for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "None"
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return "" if dataclasses.is_dataclass(value) else repr(value)
    return "(required)"


def describe_section(cls, indent: int = 0) -> list[str]:
    """One block per field of ``cls``: ``name: type = default`` and its doc on the next line; nested
    section dataclasses indented below their field; the deprecated names (``RENAMED``) at the end."""
    hints, docs, pad = typing.get_type_hints(cls), field_docs(cls), " " * indent
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        default = _default(f)
        out.append(f"{pad}{f.name}: {_type_name(tp)}" + (f" = {default}" if default else ""))
        doc = docs[f.name] or "(undocumented)"
        out += textwrap.wrap(
            doc, 110, initial_indent=pad + "    ", subsequent_indent=pad + "    ", break_on_hyphens=False
        )
        if dataclasses.is_dataclass(tp):
            out.extend(describe_section(tp, indent + 4))
        variants = f.metadata.get("variants")  # a mapping whose keys depend on another choice (e.g. the family)
        for label, variant in (variants() if variants else {}).items():
            out.append(f"{pad}    {label}:")
            out.extend(describe_section(variant, indent + 8))
    for old, new in renamed_keys(cls).items():
        out.append(f"{pad}{old}: deprecated, use {new}")
    return out


def _dataclasses_in(tp: Any) -> list[type]:
    if dataclasses.is_dataclass(tp):
        return [tp]
    return [d for arg in typing.get_args(tp) for d in _dataclasses_in(arg)]


def describe_recipe_section(name: str, tp: Any) -> list[str]:
    """``rlprox train --help-recipe NAME``: the section's fields (a section that is not a dataclass,
    e.g. ``reward: "name" | {name, weight, kwargs} | [...]``, is shown by its type and its dataclasses)."""
    if dataclasses.is_dataclass(tp):
        doc = " ".join((tp.__doc__ or "").split())
        return [f"{name}: {doc}" if doc else f"{name}:", *describe_section(tp, 4)]
    out = [f"{name}: {_type_name(tp)}"]
    for sub in dict.fromkeys(_dataclasses_in(tp)):
        out += [f"    {sub.__name__}:", *describe_section(sub, 8)]
    return out
