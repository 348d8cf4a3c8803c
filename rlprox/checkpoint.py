"""Crash-safe checkpoints: save, find, resume, and load for evaluation.

Layout of ``<run_dir>/checkpoints/iter-000010/``::

    recipe.yaml           the resolved recipe (``rlprox eval`` rebuilds from it)
    state.json            counters (iteration, optimizer steps, wall time)
    model.safetensors     weights of every trained module, keys "<module>.<param>"
    optimizer.pt          optimizer state   (loaded with torch.load(weights_only=True))
    scheduler.pt          lr-schedule state (idem)
    rank-<r>.json         per-process: RNG states, algorithm state (normalisers, env replay)
    rank-<r>.safetensors  per-process tensors of the same

Writes go to ``iter-000010.tmp/`` and the folder is renamed when every file is in
place, so a crash mid-save leaves only a ``.tmp`` folder, which is never loaded and is
removed by the next save. Loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

PREFIX = "iter-"


class CheckpointError(RuntimeError):
    """A missing or corrupt checkpoint file; ``str(err)`` is one line naming the file."""

    def __init__(self, path, problem: str):
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


def _torch_save(path: Path, obj) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def module_weights(engine) -> dict[str, torch.Tensor]:
    unwrap = engine.accelerator.unwrap_model
    return {f"{name}.{k}": v for name, m in engine.algo.modules.items() for k, v in unwrap(m).state_dict().items()}


def save(engine) -> Path:
    """Checkpoint the engine at its current iteration; returns the final folder."""
    from rlprox.engine import rng_state
    from rlprox.recipe import dump_recipe

    acc = engine.accelerator
    root = checkpoint_dir(engine.run_dir)
    final = root / f"{PREFIX}{engine.state.iteration:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if acc.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{PREFIX}*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    acc.wait_for_everyone()

    # per-process: RNG + algorithm state
    rank = acc.process_index
    rng = rng_state()
    algo_tensors, algo_json = engine.algo.state_dict() if hasattr(engine.algo, "state_dict") else ({}, {})
    tensors = {f"rng.{k}": v for k, v in rng["tensors"].items()}
    tensors.update({f"algo.{k}": v for k, v in algo_tensors.items()})
    _save_tensors(tmp / f"rank-{rank}.safetensors", tensors)
    _write_json(tmp / f"rank-{rank}.json", {"rng": rng["json"], "algo": algo_json})
    weights = module_weights(engine)
    optim_state = engine.optimizer.state_dict()
    acc.wait_for_everyone()

    if acc.is_main_process:
        _save_tensors(tmp / "model.safetensors", weights)
        _torch_save(tmp / "optimizer.pt", optim_state)
        _torch_save(tmp / "scheduler.pt", engine.scheduler.state_dict())
        (tmp / "recipe.yaml").write_text(dump_recipe(engine.recipe))
        _write_json(
            tmp / "state.json",
            {
                "iteration": engine.state.iteration,
                "optimizer_steps": engine.state.optimizer_steps,
                "wall_time": engine.state.wall_time,
                "extra": engine.state.extra,
                "num_processes": acc.num_processes,
                "modules": list(engine.algo.modules),
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
        for stale in list_checkpoints(engine.run_dir)[: -engine.recipe.run.keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
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
            shutil.rmtree(dest)
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
        raise CheckpointError(path, f"corrupt or truncated safetensors file ({str(err).splitlines()[0][:80]})") from None


def read_torch(path: Path):
    try:
        return torch.load(_require(path), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as err:  # torch raises many types for a truncated zip/pickle
        raise CheckpointError(path, f"corrupt or truncated file ({err.__class__.__name__})") from None


def read_recipe(path: Path, overrides: list[str] | None = None):
    from rlprox.recipe import load_recipe

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(path, "not a checkpoint folder")
    # the stored recipe may say how that run was resumed (a path that may be gone)
    return load_recipe(_require(path / "recipe.yaml"), ["run.resume=never", "run.overwrite=false", *(overrides or [])])


def load_weights(path: Path, modules: dict[str, torch.nn.Module], unwrap=lambda m: m) -> None:
    """Load ``model.safetensors`` into ``modules`` (strict: every key must match)."""
    file = Path(path) / "model.safetensors"
    weights = read_tensors(file)
    for name, module in modules.items():
        prefix = f"{name}."
        sub = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        try:
            unwrap(module).load_state_dict(sub, strict=True)
        except RuntimeError as err:
            raise CheckpointError(file, f"weights do not match module {name!r} ({str(err).splitlines()[0][:120]})") from None


def load(engine, path: Path) -> None:
    """Restore everything ``save`` wrote into a freshly built engine."""
    from rlprox.engine import set_rng_state

    path = Path(path)
    acc = engine.accelerator
    state = read_json(path / "state.json")
    if state.get("num_processes", 1) != acc.num_processes:
        raise CheckpointError(path, f"saved with {state.get('num_processes')} processes, resuming with {acc.num_processes}")
    load_weights(path, engine.algo.modules, acc.unwrap_model)
    try:
        engine.optimizer.load_state_dict(read_torch(path / "optimizer.pt"))
        engine.scheduler.load_state_dict(read_torch(path / "scheduler.pt"))
    except (ValueError, KeyError) as err:
        raise CheckpointError(path / "optimizer.pt", f"does not match this recipe's parameters ({err})") from None
    rank = acc.process_index
    rank_json = read_json(path / f"rank-{rank}.json")
    tensors = read_tensors(path / f"rank-{rank}.safetensors")
    set_rng_state(rank_json["rng"], {k[4:]: v for k, v in tensors.items() if k.startswith("rng.")})
    if hasattr(engine.algo, "load_state_dict"):
        engine.algo.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("algo.")}, rank_json["algo"])
    engine.state.iteration = int(state["iteration"])
    engine.state.optimizer_steps = int(state["optimizer_steps"])
    engine.state.wall_time = float(state["wall_time"])
    engine.state.extra = dict(state.get("extra", {}))
