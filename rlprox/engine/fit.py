"""The ``Engine``: builds everything a recipe names (accelerator, algorithm, optimizer,
regularizers, lr schedule, gradient sync, tracker, the checkpointed ``TrainState``)
and runs the fit loop, one iteration at a time:

    RESUME      restore the newest checkpoint (run.resume)
    COLLECT     algo.collect() under no_grad, on whole parameters
    ADVANTAGE   algo.advantages(batch)
    UPDATE      epochs × minibatches of loss + parameter penalties -> optimizer_step
    LOG         one reduction of update and iteration stats over processes
    CHECKPOINT  every run.save_every iterations and at the end
    EVALUATE    every run.eval_every iterations and at the end, after the checkpoint
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import set_seed

from rlprox import checkpoint, tracking
from rlprox.engine.contract import hook
from rlprox.engine.evaluation import run_evaluation
from rlprox.engine.grad_sync import make_gradient_sync
from rlprox.engine.optim import (
    attach_recipe_regularizers,
    build_optimizer,
    lr_lambda,
    optimizer_groups,
    optimizer_step,
    update_norm,
)
from rlprox.engine.placement import gathered, make_accelerator, place_modules, prepare_for_ddp, shard_modules
from rlprox.engine.stats import StatSums, reduce_stats
from rlprox.errors import RecipeError
from rlprox.prox.attach import LossTerms
from rlprox.recipe import Recipe
from rlprox.runtime import Runtime, make_runtime


class Engine:
    """Builds the accelerator, the algorithm, optimizer and lr schedule from a recipe
    and runs the fit loop. ``algo_builder(recipe, runtime, loss_terms) -> algorithm``
    defaults to the recipe's registered trainer."""

    def __init__(self, recipe: Recipe, algo_builder: Callable[[Recipe, Runtime, LossTerms], Any] | None = None):
        from rlprox.algos import trainer_spec

        self.recipe = recipe
        run = recipe.run
        torch.set_num_threads(run.torch_threads)
        self.run_dir = recipe.run_dir
        spec = trainer_spec(recipe.algo)
        self.eval_unit = spec.eval_unit
        _claim_run_dir(recipe)
        resume_from = resume_path(recipe)
        if resume_from is not None:  # before any model is built
            with _older_checkpoint_hint(recipe, resume_from):
                checkpoint.check_resume_keys(resume_from, recipe, spec.resume_keys)
        self.accelerator = acc = make_accelerator(run, self.run_dir)
        # Same seed on every rank for module init (identical initial weights); each
        # process samples from its own runtime streams.
        set_seed(recipe.seed)
        self.runtime = make_runtime(acc, recipe.seed, run.frozen_dtype)
        builder = algo_builder or spec.build
        # the loss-side regularizers act on tensors the trainer's loss computes: built first, handed to its build
        self.loss_terms = LossTerms.from_specs(recipe.regularizers)
        with acc.main_process_first():  # zoo builds and model loading: once, by rank 0 first
            self.algo = builder(recipe, self.runtime, self.loss_terms)
        place_modules(self.algo, self.runtime)
        self.fsdp = shard_modules(self.algo, run, acc)
        acc.gradient_accumulation_steps = run.gradient_accumulation_steps * hook(self.algo, "micro_steps", 1)
        self.names = list(self.algo.modules)
        self.frozen = hook(self.algo, "frozen") or {}
        self.base_optimizer = build_optimizer(optimizer_groups(self.algo, recipe.optim), recipe.optim)
        self.optimizer, attached = attach_recipe_regularizers(
            self.base_optimizer, self.algo, recipe.regularizers, sharded=self.fsdp
        )
        self.regularizers = sorted(self.loss_terms.entries + attached, key=lambda r: r.index)  # recipe order
        self.penalized = [r for r in self.regularizers if r.mode == "penalty"]
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(recipe.optim.lr_schedule, run.iterations, recipe.optim.warmup_iterations)
        )
        self.ddp = run.grad_sync == "ddp" and acc.num_processes > 1
        self.optimizer = prepare_for_ddp(self.algo, self.optimizer, acc) if self.ddp else acc.prepare(self.optimizer)
        self.params = [p for n in self.names for p in self.algo.modules[n].parameters() if p.requires_grad]
        syncs_itself = self.ddp or self.fsdp or acc.num_processes == 1
        self._sync = None if syncs_itself else make_gradient_sync(self.params, run.grad_sync, acc)
        self.state = checkpoint.TrainState(
            recipe=recipe,
            run_dir=self.run_dir,
            accelerator=acc,
            runtime=self.runtime,
            modules=self.algo.modules,
            frozen_modules=list(self.frozen),
            optimizer=self.base_optimizer,
            lr_schedule=self.lr_schedule,
            algo_state=hook(self.algo, "state_dict"),
            load_algo_state=hook(self.algo, "load_state_dict"),
        )
        self.tracker = tracking.Tracker(acc, self.run_dir, recipe, curve=hook(self.algo, "curve"))

    # ------------------------------------------------------------------ the fit loop
    def fit(self) -> dict[str, float]:
        """Train until ``run.iterations`` (or ``run.stop_after``: the first iterations of
        that run, its schedules unchanged; a resume with a later stop goes on with the
        same run); returns the last iteration's stats (with its evaluation's, when it has one)."""
        run, algo, state = self.recipe.run, self.algo, self.state
        end = run.stop_after or run.iterations
        # ---- RESUME
        self.resume()
        self.tracker.start(total=end, initial=state.iteration)
        advantages, after_update = hook(algo, "advantages"), hook(algo, "after_update")
        can_evaluate = hook(algo, "evaluate") is not None and run.eval_size > 0
        stats: dict[str, float] = {}
        while state.iteration < end:
            it = state.iteration + 1
            last = it == end
            start = time.perf_counter()
            for reg in self.regularizers:  # λ schedules are per iteration
                reg.set_iteration(it - 1)
            # ---- COLLECT (no grad, whole parameters)
            with torch.no_grad(), self.gathered():
                batch = algo.collect()
                # ---- ADVANTAGE
                if advantages is not None:
                    batch = advantages(batch)
            collect_time = time.perf_counter() - start
            # ---- UPDATE
            local = self.update(batch)
            self.lr_schedule.step()
            if after_update is not None:
                with torch.no_grad():
                    after_update()
            elapsed = time.perf_counter() - start
            state.iteration = it
            state.wall_time += elapsed
            # ---- LOG: one reduction over processes for update and iteration stats
            stats = self.iteration_stats(batch, local, elapsed, collect_time)
            self.tracker.log(stats, step=it)
            # ---- CHECKPOINT, before EVALUATE: an evaluation that raises cannot lose this iteration
            if (run.save_every and it % run.save_every == 0) or last:
                self.tracker.last_checkpoint = checkpoint.save(state)
            # ---- EVALUATE: its stats join this iteration's metrics row
            if can_evaluate and ((run.eval_every and it % run.eval_every == 0) or last):
                eval_stats = self.evaluate(run.eval_size, step=it)
                self.tracker.amend(eval_stats, step=it)
                stats.update(eval_stats)
        self.tracker.finish()
        return stats

    def resume(self) -> None:
        """``run.resume``: load the newest checkpoint (auto) or the one named into
        ``state``; metrics logged past it are dropped and newer checkpoints (an
        abandoned branch) set aside, so the run reads as if it had never stopped."""
        run, state = self.recipe.run, self.state
        if run.resume == "never":
            return
        path = resume_path(self.recipe)
        if path is None:
            self.tracker.truncate(0)  # a run killed before its first checkpoint
            self.tracker.message("run.resume=auto: no checkpoint found, starting fresh")
            return
        with _older_checkpoint_hint(self.recipe, path):
            checkpoint.load(state, path)
        self.tracker.truncate(state.iteration)
        if self.accelerator.is_main_process:
            moved = checkpoint.set_aside_newer(self.run_dir, state.iteration)
            if moved:
                self.tracker.message(f"moved {len(moved)} newer checkpoint(s) to {moved[0].parent}")
        self.tracker.message(f"resumed from {path} (iteration {state.iteration})")

    def update(self, batch) -> dict[str, float]:
        """Epochs × minibatches of loss/backward/sync/clip/step; returns this process's
        mean stats (``fit`` reduces them over processes with the iteration stats)."""
        algo, acc = self.algo, self.accelerator
        modules = [algo.modules[n] for n in self.names]
        epochs = hook(algo, "update_epochs", 1)
        minibatches = hook(algo, "minibatches")
        early_stop = hook(algo, "early_stop")
        autocast = acc.autocast if self.recipe.run.mixed_precision != "no" else contextlib.nullcontext
        total = StatSums()
        epoch = 0
        # run.log_update_norm: the weights before the next optimizer step
        previous = [p.detach().clone() for p in self.params] if self.recipe.run.log_update_norm else None
        for epoch in range(epochs):
            epoch_stats = StatSums()
            for mb in minibatches(batch, epoch) if minibatches else [batch]:
                with autocast():
                    loss, stats = algo.loss(mb)
                    for reg in self.penalized:  # mode: penalty, λ·R(params) added to the loss
                        loss = loss + reg.parameter_penalty()
                grad_norm = optimizer_step(
                    acc, loss, modules, self.optimizer, self.recipe.optim.max_grad_norm, self.params, self._sync
                )
                stats = dict(stats)
                if acc.sync_gradients:
                    self.state.optimizer_steps += 1
                    if previous is not None:
                        stats["optim/update_norm"] = update_norm(self.params, previous)
                stats["loss/total"] = loss.detach()
                if grad_norm is not None:
                    stats["loss/grad_norm"] = grad_norm
                epoch_stats.add(stats)
            total.merge(epoch_stats)
            if early_stop is not None:
                means = epoch_stats.local_means(acc.device)
                if early_stop(reduce_stats(means, {}, acc)):
                    break
        out = total.local_means(acc.device)
        out["loss/epochs"] = epoch + 1
        return out

    def iteration_stats(
        self, batch: Any, local: dict[str, float], elapsed: float, collect_time: float
    ) -> dict[str, float]:
        """This iteration's metrics: ``local`` update stats and the algorithm's
        ``iteration_stats`` reduced over processes in one all-reduce, plus the
        regularizers' stats, the lr and the iteration."""
        algo_stats = hook(self.algo, "iteration_stats")
        if algo_stats is not None:
            local.update(algo_stats(batch, elapsed))
        local["perf/iteration_s"] = elapsed
        local["perf/collect_fraction"] = collect_time / max(elapsed, 1e-9)
        stats = reduce_stats(local, dict(hook(self.algo, "stat_reductions") or {}), self.accelerator)
        for reg in self.regularizers:
            stats.update(reg.stats())
        stats["optim/lr"] = self.lr_schedule.get_last_lr()[0]
        stats["progress/iteration"] = self.state.iteration
        return stats

    def gathered(self):
        """Whole parameters for sampling (``gathered``); a no-op unless FSDP shards them."""
        return (
            gathered(self.algo.modules.values(), self.recipe.run.fsdp.reshard_after_forward)
            if self.fsdp
            else contextlib.nullcontext()
        )

    def evaluate(self, total: int, step: int | None = None) -> dict[str, float]:
        """Sharded evaluation of ``total`` items on whole parameters; its image grids
        are logged at ``step``."""
        with self.tracker.phase(f"evaluating {total} {self.eval_unit}"), self.gathered():
            stats, _, images, info = run_evaluation(self.algo, self.accelerator, total, self.recipe.seed)
        if images and step is not None:
            self.tracker.log_images(images, step, cols=info.get("grid_cols", 0))
        return stats

    def close(self):
        closer = hook(self.algo, "close")
        if closer is not None:
            closer()
        if self._sync is not None:
            self._sync.close()
        self.accelerator.end_training()


def resume_path(recipe: Recipe) -> Path | None:
    """The checkpoint ``run.resume`` names: the run's newest (auto; None when it has
    none), a path, or None (never)."""
    if recipe.run.resume == "never":
        return None
    return checkpoint.find_latest(recipe.run_dir) if recipe.run.resume == "auto" else Path(recipe.run.resume)


@contextlib.contextmanager
def _older_checkpoint_hint(recipe: Recipe, path: Path):
    """``--resume`` of a corrupt newest checkpoint: its one-line error also names the
    older complete checkpoint ``run.resume=PATH`` would resume from. Not used in its
    place: which one to give up is the user's call, and the corrupt one may be
    repairable (a full disk, a copy cut short)."""
    try:
        yield
    except checkpoint.CheckpointError as err:
        older = checkpoint.previous_checkpoint(path) if recipe.run.resume == "auto" else None
        if older is None:
            raise
        raise checkpoint.CheckpointError(
            err.path,
            f"{err.problem}; the previous complete checkpoint is {older}: resume from it with run.resume={older}",
        ) from None


def _claim_run_dir(recipe: Recipe) -> None:
    """A fresh run never mixes with (or prunes) an earlier run's files: starting one in
    a folder that holds checkpoints is an error unless ``run.overwrite`` says to delete
    them. A folder with logs or metrics but no checkpoint (a run stopped before its
    first save: nothing to resume) is replaced, with one line saying so. Runs on every
    rank before any work; only rank 0 deletes."""
    import shutil
    import sys

    run_dir = recipe.run_dir
    has_checkpoints = bool(checkpoint.list_checkpoints(run_dir))
    holds_run = has_checkpoints or (run_dir / "metrics.jsonl").exists() or (run_dir / "logs").exists()
    if recipe.run.resume != "never" or not holds_run:
        return
    if has_checkpoints and not recipe.run.overwrite:
        raise RecipeError(
            "run.name",
            f"{run_dir} already holds a run; continue it with --resume (run.resume=auto), "
            "start another with run.name=NEW, or replace it with run.overwrite=true",
        )
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if not has_checkpoints:
        print(f"{run_dir} holds no checkpoint (a run stopped before its first save): replacing it", file=sys.stderr)
    shutil.rmtree(checkpoint.checkpoint_dir(run_dir), ignore_errors=True)
    shutil.rmtree(run_dir / "logs", ignore_errors=True)
    shutil.rmtree(run_dir / "samples", ignore_errors=True)
    for name in ("metrics.jsonl", "learning_curve.png"):
        (run_dir / name).unlink(missing_ok=True)
