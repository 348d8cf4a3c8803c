"""Crash-safe checkpoints: save, find, resume, and load for evaluation.

Layout of ``<run_dir>/checkpoints/iter-000010/``::

    recipe.yaml           the resolved recipe (``rlprox eval`` rebuilds from it)
    state.json            counters (iteration, optimizer steps, wall time)
    model.safetensors     trainable parameters and persistent buffers of every trained
                          module, keys "<module>.<param>" (a LoRA run: the adapter only;
                          frozen modules and frozen base weights are rebuilt from the
                          recipe, never saved)
    optimizer.safetensors optimizer state tensors, keys "state/<module>.<param>/<key>"
                          (e.g. Adam's exp_avg), whole even when FSDP shards them
    optimizer.json        its param groups (parameter names, not indices) and numbers
    lr_schedule.json      lr-schedule state (``scheduler.json`` in older checkpoints)
    rank-<r>.json         per-process: RNG states (global and the engine's per-rank
                          sampling streams), algorithm state (normalisers, env replay)
    rank-<r>.safetensors  per-process tensors of the same

Writes go to ``iter-000010.tmp/`` and the folder is renamed when every file is in
place, so a crash mid-save leaves only a ``.tmp`` folder, which is never loaded and is
removed by the next save. Old checkpoints are pruned the same way round: renamed to
``iter-000010.del.tmp`` first, then deleted, so a folder named like a checkpoint is
always complete. Nothing is pickled: tensors go to safetensors, everything else to
JSON or YAML. Everything saved is named by one dataclass, ``TrainState``: ``save`` and
``load`` read and restore that object, never the engine.

Under FSDP (``run.grad_sync: fsdp``) every process takes part in gathering the sharded
weights and optimizer tensors, rank 0 writes them whole, and loading splits them again
over the processes of the resuming run: the files look the same as without FSDP.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from rlprox.prox.regularizers import full_tensor

PREFIX = "iter-"
LR_SCHEDULE_FILE = "lr_schedule.json"


@dataclass
class TrainState:
    """Everything a checkpoint saves and a resume restores, in one place: the engine
    builds one (references to its live objects) and advances the counters; ``save`` and
    ``load`` read and restore only this.

    Written whole by rank 0: the weights of ``modules``, ``optimizer`` state,
    ``lr_schedule``, the counters, ``recipe``, the module names. Written by every
    process: the global RNGs, ``runtime``'s sampling streams, the algorithm's state.
    Not written: frozen modules (rebuilt from ``recipe``; only their names go to
    state.json) and the regularizers' λ and prox steps (functions of ``iteration``,
    set again at the start of every iteration)."""

    recipe: Any  # rlprox.recipe.Recipe, saved as recipe.yaml; run.keep_last prunes
    run_dir: Path
    accelerator: Any  # rank, number of processes, barriers, unwrapping DDP
    runtime: Any  # rlprox.runtime.Runtime: its per-process ``generator`` and ``np_rng``
    modules: dict[str, torch.nn.Module]  # trained modules (the algorithm's own dict)
    frozen_modules: list[str]  # names only
    optimizer: torch.optim.Optimizer  # the torch optimizer under the prox/accelerate wrappers
    lr_schedule: Any  # torch.optim.lr_scheduler.LRScheduler
    algo_state: Callable[[], tuple[dict, dict]] | None = None  # the algorithm's state_dict hook
    load_algo_state: Callable[[dict, dict], None] | None = None  # its load_state_dict hook
    iteration: int = 0  # completed iterations
    optimizer_steps: int = 0
    wall_time: float = 0.0  # seconds spent in iterations, over all resumes


class CheckpointError(RuntimeError):
    """A missing or corrupt checkpoint file; ``str(err)`` is one line naming the file."""

    def __init__(self, path, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"checkpoint error: {path}: {problem}")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def find_latest(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def previous_checkpoint(path: Path) -> Path | None:
    """The newest complete checkpoint of the same run older than ``path``, or None."""
    found = list_checkpoints(Path(path).parent.parent)
    index = found.index(Path(path)) if Path(path) in found else 0
    return found[index - 1] if index > 0 else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # clone: safetensors refuses tensors that share storage (tied weights, views)
    save_file({k: v.detach().to("cpu").clone().contiguous() for k, v in tensors.items()}, str(path))


def trained_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint keeps of a trained module: its trainable parameters and its
    persistent buffers. Frozen parameters inside it (a LoRA base model) are left out.
    FSDP-sharded parameters come as DTensors (``module_weights`` gathers them)."""
    state = module.state_dict()
    params = dict(module.named_parameters(remove_duplicate=False))
    return {k: v for k, v in state.items() if k not in params or params[k].requires_grad}


def module_weights(modules: dict, unwrap=lambda m: m) -> dict[str, torch.Tensor]:
    """Every trained module's ``trained_state``, keys "<module>.<name>", whole tensors
    (FSDP shards are gathered: every process must call this, in the same order)."""
    return {f"{name}.{k}": full_tensor(v) for name, m in modules.items() for k, v in trained_state(unwrap(m)).items()}


def _like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A whole saved tensor laid out like ``target``: split into this process's shard
    when ``target`` is an FSDP-sharded DTensor (no communication: every process holds
    the whole tensor), else unchanged."""
    mesh = getattr(target, "device_mesh", None)
    if mesh is None or tuple(value.shape) != tuple(target.shape):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(target.device, target.dtype), mesh, target.placements, src_data_rank=None)


# ----------------------------------------------------------------------------- optimizer


def parameter_names(modules: dict, unwrap=lambda m: m) -> dict[int, str]:
    """id(parameter) -> "<module>.<param>" for every trainable parameter."""
    return {
        id(p): f"{name}.{pname}"
        for name, m in modules.items()
        for pname, p in unwrap(m).named_parameters()
        if p.requires_grad
    }


def optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict]:
    """A torch optimizer's state keyed by parameter names, without pickle: (tensors
    "state/<param>/<key>", gathered whole from FSDP shards — every process must call
    this — and JSON: the param groups with parameter names, and non-tensor state)."""
    tensors: dict[str, torch.Tensor] = {}
    numbers: dict[str, dict] = {}
    groups = []
    for group in optimizer.param_groups:
        groups.append(
            {**{k: v for k, v in group.items() if k != "params"}, "params": [names[id(p)] for p in group["params"]]}
        )
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    tensors[f"state/{names[id(p)]}/{key}"] = full_tensor(value)
                else:
                    numbers.setdefault(names[id(p)], {})[key] = value
    return tensors, {"param_groups": groups, "state": numbers}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict[str, torch.Tensor], state: dict, file: Path
) -> None:
    """Restore ``optimizer_state``'s output into ``optimizer`` (whose parameters must have
    the same names, in the same groups), re-sharding tensors of FSDP parameters."""
    saved = [g["params"] for g in state["param_groups"]]
    current = [[names.get(id(p), "?") for p in g["params"]] for g in optimizer.param_groups]
    if saved != current:
        flat_saved, flat_current = [n for g in saved for n in g], [n for g in current for n in g]
        first = next(((a, b) for a, b in zip(flat_saved, flat_current) if a != b), None)
        if first:
            why = f"saved {first[0]!r} where this run has {first[1]!r}"
        elif len(flat_saved) != len(flat_current):
            why = f"{len(flat_saved)} saved parameters, {len(flat_current)} here"
        else:
            why = "the same parameters in other param groups"
        raise CheckpointError(file, f"does not match this recipe's parameters ({why})")
    index, params = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            index[names[id(p)]] = len(index)
            params[names[id(p)]] = p
    per_param: dict[int, dict] = {index[n]: dict(v) for n, v in state["state"].items()}
    for key, value in tensors.items():
        name, slot = key[len("state/") :].rsplit("/", 1)
        if name not in index:
            raise CheckpointError(file, f"holds state of an unknown parameter {name!r}")
        per_param.setdefault(index[name], {})[slot] = _like(value, params[name])
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})


# ----------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """Process-global RNG states (python, numpy legacy, torch CPU/CUDA) as JSON + tensors."""
    np_state = np.random.get_state()
    state = {
        "python": _to_json(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    return {"json": state, "tensors": tensors}


def set_rng_state(json_state: dict, tensors: dict) -> None:
    random.setstate(_from_json(json_state["python"]))
    kind, keys, *rest = json_state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [
            tensors[k]
            for k in sorted(
                (k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1])
            )
        ]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def _to_json(obj):
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json(x) for x in obj]}
    return obj


def _from_json(obj):
    if isinstance(obj, dict) and "__tuple__" in obj:
        return tuple(_from_json(x) for x in obj["__tuple__"])
    return obj


def _runtime_state(runtime) -> tuple[dict, dict]:
    """The engine's per-rank sampling streams."""
    return {"generator": runtime.generator.get_state()}, {"np_rng": runtime.np_rng.bit_generator.state}


def _load_runtime_state(runtime, tensors: dict, state: dict) -> None:
    runtime.generator.set_state(tensors["generator"])
    runtime.np_rng.bit_generator.state = state["np_rng"]


# ----------------------------------------------------------------------------- saving


def _remove(path: Path) -> None:
    """Delete a folder so that it never looks like a checkpoint while going: rename
    it to ``<name>.del.tmp`` first (atomic), then remove that."""
    trash = path.with_name(path.name + ".del.tmp")
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def save(state: TrainState) -> Path:
    """Checkpoint ``state`` at its current iteration; every process calls it. Returns
    the final folder."""
    from rlprox.recipe import dump_recipe

    acc = state.accelerator
    root = checkpoint_dir(state.run_dir)
    final = root / f"{PREFIX}{state.iteration:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if acc.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{PREFIX}*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    acc.wait_for_everyone()

    # per-process: RNG + sampling streams + algorithm state
    rank = acc.process_index
    rng = rng_state()
    runtime_tensors, runtime_json = _runtime_state(state.runtime)
    algo_tensors, algo_json = state.algo_state() if state.algo_state is not None else ({}, {})
    tensors = {f"rng.{k}": v for k, v in rng["tensors"].items()}
    tensors.update({f"engine.{k}": v for k, v in runtime_tensors.items()})
    tensors.update({f"algo.{k}": v for k, v in algo_tensors.items()})
    _save_tensors(tmp / f"rank-{rank}.safetensors", tensors)
    _write_json(tmp / f"rank-{rank}.json", {"rng": rng["json"], "engine": runtime_json, "algo": algo_json})
    # collectives under FSDP: every process gathers, rank 0 writes
    weights = module_weights(state.modules, acc.unwrap_model)
    optim_tensors, optim_json = optimizer_state(state.optimizer, parameter_names(state.modules, acc.unwrap_model))
    acc.wait_for_everyone()

    if acc.is_main_process:
        _save_tensors(tmp / "model.safetensors", weights)
        _save_tensors(tmp / "optimizer.safetensors", optim_tensors)
        _write_json(tmp / "optimizer.json", optim_json)
        _write_json(tmp / LR_SCHEDULE_FILE, state.lr_schedule.state_dict())
        (tmp / "recipe.yaml").write_text(dump_recipe(state.recipe))
        frozen_params = {
            name: sum(1 for _, p in acc.unwrap_model(m).named_parameters() if not p.requires_grad)
            for name, m in state.modules.items()
        }
        _write_json(
            tmp / "state.json",
            {
                "iteration": state.iteration,
                "optimizer_steps": state.optimizer_steps,
                "wall_time": state.wall_time,
                "num_processes": acc.num_processes,
                "modules": list(state.modules),
                # rebuilt from recipe.yaml, never saved:
                "frozen_modules": list(state.frozen_modules),
                "frozen_parameters": {k: v for k, v in frozen_params.items() if v},
            },
        )
        _fsync_dir(tmp)
        if final.exists():  # same iteration saved again (e.g. after a resume): replace
            old = final.with_name(final.name + ".old.tmp")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(root)
        for stale in list_checkpoints(state.run_dir)[: -state.recipe.run.keep_last]:
            _remove(stale)
        _fsync_dir(root)
    acc.wait_for_everyone()
    return final


def set_aside_newer(run_dir: Path, iteration: int) -> list[Path]:
    """After resuming from an older checkpoint, move the newer ones (an abandoned
    branch) to ``checkpoints/abandoned-<iteration>/`` so neither pruning nor a later
    ``--resume`` picks them up; nothing is deleted."""
    newer = [p for p in list_checkpoints(run_dir) if int(p.name[len(PREFIX) :]) > iteration]
    if not newer:
        return []
    target = checkpoint_dir(run_dir) / f"abandoned-from-{iteration:06d}"
    target.mkdir(exist_ok=True)
    moved = []
    for p in newer:
        dest = target / p.name
        if dest.exists():
            _remove(dest)
        p.rename(dest)
        moved.append(dest)
    return moved


# ----------------------------------------------------------------------------- loading


def _require(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(path, "missing (incomplete or not a checkpoint folder)")
    return path


def read_json(path: Path) -> dict:
    try:
        return json.loads(_require(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(path, f"corrupt JSON ({err.__class__.__name__})") from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(_require(path)))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            path, f"corrupt or truncated safetensors file ({str(err).splitlines()[0][:80]})"
        ) from None


def read_recipe(path: Path, overrides: list[str] | None = None, scoring: bool = True):
    """The recipe saved in a checkpoint folder, validated (``scoring`` False: not what only
    scoring needs, for an export)."""
    from rlprox.recipe import load_recipe

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(path, "not a checkpoint folder")
    # the stored recipe may say how that run was resumed (a path that may be gone)
    return load_recipe(
        _require(path / "recipe.yaml"), ["run.resume=never", "run.overwrite=false", *(overrides or [])], scoring
    )


def check_resume_keys(path: Path, recipe, keys: tuple[str, ...]) -> None:
    """Each "section.field" of ``keys`` (a trainer's ``resume_keys``: they fix the shape
    of the saved state, e.g. LoRA or full fine-tuning) must equal the value saved in the
    checkpoint's recipe.yaml; a ``RecipeError`` naming the key and both values otherwise.
    Reads only recipe.yaml, so it runs before any model is built."""
    import yaml

    from rlprox.errors import RecipeError

    if not keys:
        return
    file = Path(path) / "recipe.yaml"
    try:
        saved = yaml.safe_load(_require(file).read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise CheckpointError(file, f"corrupt YAML ({err.__class__.__name__})") from None
    current = recipe.to_dict()
    for key in keys:
        section, name = key.split(".", 1)
        if name not in (saved.get(section) or {}):
            continue  # saved before the key existed
        then, now = saved[section][name], current[section][name]
        if then != now:
            raise RecipeError(
                key,
                f"the checkpoint {path} was saved with {key}={then} and this run has {key}={now}; "
                f"it fixes the shape of the saved state: resume with {key}={then}, or start another run with "
                "run.name=NEW",
            )


def load_weights(path: Path, modules: dict[str, torch.nn.Module], unwrap=lambda m: m) -> None:
    """Load ``model.safetensors`` into ``modules``: every saved key must match, and
    every key of a module must be saved unless it is a frozen parameter."""
    file = Path(path) / "model.safetensors"
    weights = read_tensors(file)
    names = set()
    for name, module in modules.items():
        prefix = f"{name}."
        sub = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        names |= {prefix + k for k in sub}
        module = unwrap(module)
        expected = trained_state(module)
        sub = {k: _like(v, expected[k]) if k in expected else v for k, v in sub.items()}  # FSDP: this process's shards
        try:
            result = module.load_state_dict(sub, strict=False)
        except RuntimeError as err:
            raise CheckpointError(
                file, f"weights do not match module {name!r} ({str(err).splitlines()[0][:120]})"
            ) from None
        missing = [k for k in result.missing_keys if k in expected]
        if missing or result.unexpected_keys:
            problem = f"missing {missing[0]!r}" if missing else f"unexpected {result.unexpected_keys[0]!r}"
            raise CheckpointError(
                file,
                f"weights do not match module {name!r} ({problem}; {len(missing)} "
                f"missing, {len(result.unexpected_keys)} unexpected)",
            )
    stray = sorted(set(weights) - names)
    if stray:
        raise CheckpointError(file, f"holds weights of a module this recipe does not build ({stray[0]!r})")


def load(state: TrainState, path: Path) -> None:
    """Restore everything ``save`` wrote into ``state`` (built by a fresh engine for
    the same recipe and number of processes)."""
    path = Path(path)
    acc = state.accelerator
    saved = read_json(path / "state.json")
    if saved.get("num_processes", 1) != acc.num_processes:
        raise CheckpointError(
            path, f"saved with {saved.get('num_processes')} processes, resuming with {acc.num_processes}"
        )
    load_weights(path, state.modules, acc.unwrap_model)
    file = path / "optimizer.safetensors"
    tensors, optim_json = read_tensors(file), read_json(path / "optimizer.json")
    try:
        load_optimizer_state(
            state.optimizer, parameter_names(state.modules, acc.unwrap_model), tensors, optim_json, file
        )
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            file, f"does not match this recipe's parameters ({str(err).splitlines()[0][:120]})"
        ) from None
    schedule_file = path / LR_SCHEDULE_FILE
    if not schedule_file.exists() and (path / "scheduler.json").exists():  # written before the rename
        schedule_file = path / "scheduler.json"
    try:
        state.lr_schedule.load_state_dict(read_json(schedule_file))
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(schedule_file, f"does not match this recipe's schedule ({err})") from None
    rank = acc.process_index
    rank_json = read_json(path / f"rank-{rank}.json")
    tensors = read_tensors(path / f"rank-{rank}.safetensors")
    set_rng_state(rank_json["rng"], _prefixed(tensors, "rng."))
    _load_runtime_state(state.runtime, _prefixed(tensors, "engine."), rank_json["engine"])
    if state.load_algo_state is not None:
        state.load_algo_state(_prefixed(tensors, "algo."), rank_json["algo"])
    state.iteration = int(saved["iteration"])
    state.optimizer_steps = int(saved["optimizer_steps"])
    state.wall_time = float(saved["wall_time"])


def load_for_eval(path: Path, modules: dict, loader=None) -> None:
    """Weights into ``modules`` and rank 0's algorithm state (e.g. normalisation
    statistics) into ``loader(tensors, json)``; every process loads the same."""
    path = Path(path)
    load_weights(path, modules)
    if loader is not None:
        rank_json = read_json(path / "rank-0.json")
        tensors = read_tensors(path / "rank-0.safetensors")
        loader(_prefixed(tensors, "algo."), rank_json["algo"])


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or a run folder (its newest complete checkpoint)."""
    path = Path(path)
    if path.is_dir() and not (path / "recipe.yaml").exists():
        latest = find_latest(path)
        if latest is not None:
            return latest
    return path


def _base_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's and the prox wrappers (they share its state)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    return getattr(optimizer, "base", optimizer)


def _prefixed(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
