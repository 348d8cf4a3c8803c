"""The one on-policy training loop, on ``accelerate``, and the algorithm contract.

    algo = build(recipe, runtime, loss_terms)     # loss-side regularizers built first, handed over
    for it in iterations:
        batch = algo.collect()                    # no grad, whole parameters; old log-probs stored
        batch = algo.advantages(batch)            # GAE / leave-one-out / group norm
        for epoch in range(algo.update_epochs):
            for minibatch in algo.minibatches(batch, epoch):
                loss, stats = algo.loss(minibatch) (+ parameter penalties)
                optimizer_step(...)               # backward; every micro_steps × accumulation calls:
                                                  # grad sync, clip, step, prox
            if algo.early_stop(epoch stats): break
        algo.after_update(); lr schedule step
        stats = update stats + algo.iteration_stats(batch, elapsed), reduced over processes; log
        maybe checkpoint; then maybe evaluate (sharded)

The engine knows nothing about gymnasium, images or tokens. An algorithm is built by
its trainer's ``build(recipe, runtime, loss_terms)`` (``rlprox.algos``) and is any object that
satisfies ``Algorithm``; every optional hook is listed in ``AlgorithmHooks`` and read
only through ``hook(algo, name)``. One job per file:

    contract.py     Algorithm, AlgorithmHooks, OPTIONAL_HOOKS, hook
    fit.py          Engine: builds everything from a recipe and runs the fit loop
    placement.py    the accelerator, module roles on the device, DDP, FSDP2 sharding
    optim.py        optimizer, param groups, lr schedule, regularizers, optimizer_step
    grad_sync.py    gradient averaging over processes without DDP/FSDP
    stats.py        per-minibatch stat sums, reduction over processes
    evaluation.py   sharded evaluation, rebuilding a checkpoint for eval/export

What a checkpoint saves is ``rlprox.checkpoint.TrainState``. docs/algorithm-contract.md
says all this in prose, with the module roles, the per-rank services and the lifecycle.
"""

from rlprox.engine.contract import OPTIONAL_HOOKS, Algorithm, AlgorithmHooks, hook
from rlprox.engine.evaluation import build_for_eval, run_evaluation
from rlprox.engine.fit import Engine
from rlprox.engine.grad_sync import GradientAverager, SharedMemoryAverager, make_gradient_sync
from rlprox.engine.optim import (
    attach_recipe_regularizers,
    build_optimizer,
    lr_lambda,
    optimizer_groups,
    optimizer_step,
)
from rlprox.engine.placement import (
    forward_methods,
    gathered,
    make_accelerator,
    place_modules,
    prepare_for_ddp,
    shard_modules,
)
from rlprox.engine.stats import StatSums, reduce_stats
from rlprox.runtime import EvalRequest, EvalShard, Runtime, make_runtime, shard

__all__ = [
    "OPTIONAL_HOOKS",
    "Algorithm",
    "AlgorithmHooks",
    "Engine",
    "EvalRequest",
    "EvalShard",
    "GradientAverager",
    "Runtime",
    "SharedMemoryAverager",
    "StatSums",
    "attach_recipe_regularizers",
    "build_for_eval",
    "build_optimizer",
    "forward_methods",
    "gathered",
    "hook",
    "lr_lambda",
    "make_accelerator",
    "make_gradient_sync",
    "make_runtime",
    "optimizer_groups",
    "optimizer_step",
    "place_modules",
    "prepare_for_ddp",
    "reduce_stats",
    "run_evaluation",
    "shard",
    "shard_modules",
]
