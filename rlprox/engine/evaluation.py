"""Evaluation: the sharded ``run_evaluation`` (every process evaluates its share of
the items, the shards are gathered and summarised) and ``build_for_eval``, which
rebuilds a trained algorithm from a checkpoint folder for ``rlprox eval`` and
``rlprox export``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from rlprox import checkpoint
from rlprox.engine.contract import hook
from rlprox.engine.placement import make_accelerator, place_modules
from rlprox.prox.attach import LossTerms
from rlprox.runtime import EvalRequest, EvalShard, make_runtime, shard


def run_evaluation(
    algo,
    accelerator: Accelerator,
    total: int,
    seed: int,
    deterministic: bool | None = None,
    prompts: list[str] | None = None,
    guidance_scale: float | None = None,
):
    """Sharded evaluation: every process evaluates its share, shards are gathered;
    returns (stats with "eval/" keys, per-item values, images, info) on every rank.
    Scalar values become ``eval/<key>`` (mean) and ``eval/<key>_std``, except keys that
    start with "_" (per-item data only ``summarize_eval`` reads)."""
    evaluate = hook(algo, "evaluate")
    rank, world = accelerator.process_index, accelerator.num_processes
    start, num = shard(total, rank, world)
    request = EvalRequest(
        total=total,
        num=num,
        start=start,
        seed=seed,
        rank=rank,
        world=world,
        deterministic=deterministic,
        prompts=prompts,
        guidance_scale=guidance_scale,
    )
    result = evaluate(request) if num > 0 else EvalShard()
    shards = [result]
    if world > 1:
        from accelerate.utils import gather_object

        payload = {
            "values": result.values,
            "images": {k: v.detach().cpu() for k, v in result.images.items()},
            "info": result.info,
            "grid_cols": result.grid_cols,
        }
        shards = [EvalShard(**s) for s in gather_object([payload])]
    values: dict[str, list] = {}
    images: dict[str, list] = {}
    for s in shards:
        for k, v in s.values.items():
            values.setdefault(k, []).extend(list(v))
        for k, v in s.images.items():
            images.setdefault(k, []).append(v.detach().cpu())
    stats: dict[str, float] = {}
    for k, v in values.items():
        if not k.startswith("_") and v and all(isinstance(x, (int, float, bool, np.number)) for x in v):
            arr = np.asarray(v, np.float64)
            stats[f"eval/{k}"] = float(np.nanmean(arr)) if np.isfinite(arr).any() else float("nan")
            stats[f"eval/{k}_std"] = float(np.nanstd(arr)) if np.isfinite(arr).any() else float("nan")
    stats["eval/count"] = max((len(v) for v in values.values()), default=0)
    summarize = hook(algo, "summarize_eval")
    if summarize is not None:
        stats.update({f"eval/{k}": v for k, v in summarize(values).items()})
    grid_cols = next((s.grid_cols for s in shards if s.grid_cols), 0)
    return stats, values, {k: torch.cat(v) for k, v in images.items()}, {"grid_cols": grid_cols, **shards[0].info}


def build_for_eval(path: Path, cpu: bool | None = None, scoring: bool = True):
    """(recipe, accelerator, runtime, algorithm) rebuilt from a checkpoint folder with
    its trained weights and rank-0 algorithm state loaded: what ``rlprox eval`` and
    ``rlprox export`` run on. Works under ``accelerate launch`` (each process builds).
    ``scoring`` False (export): reward models are not built."""
    from rlprox.algos import trainer_spec

    recipe = checkpoint.read_recipe(path, ["run.log_with=[]"], scoring=scoring)
    torch.set_num_threads(recipe.run.torch_threads)
    run = recipe.run
    if cpu is not None:
        run.cpu = cpu
    accelerator = make_accelerator(run)
    set_seed(recipe.seed)
    runtime = make_runtime(accelerator, recipe.seed, run.frozen_dtype, train=False, scoring=scoring)
    with accelerator.main_process_first():
        algo = trainer_spec(recipe.algo).build(recipe, runtime, LossTerms.from_specs(recipe.regularizers))
    place_modules(algo, runtime)
    checkpoint.load_for_eval(path, algo.modules, hook(algo, "load_state_dict"))
    return recipe, accelerator, runtime, algo
