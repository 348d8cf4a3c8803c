"""LOOP on digits-sd3 (flow matching, Flow-GRPO's SDE): speed against a naive loop, and the advantage arms.

    python benchmarks/loop_flow.py --speed                 # rlprox vs a naive Flow-GRPO-style loop, images/s
                                                           # (writes benchmarks/results/loop_flow_speed.md)
    python benchmarks/loop_flow.py                         # science: 5 arms × --lrs × --seeds (many CPU-hours)
    python benchmarks/loop_flow.py --arms loop,control --seeds 2   # a part of the grid (runs are reused)
    python benchmarks/loop_flow.py --seeds 1 --lrs 1e-4 --iterations 2 --eval-size 8 --out /tmp/lf/loop_flow.md
                                                           # smoke
    python benchmarks/loop_flow.py --target                # the shipped digits-sd3 recipe on 2 processes
                                                           # (torchrun), seeds 1-3: loop_flow_target.md
    python benchmarks/loop_flow.py --target-paraphrased    # the same on prompts new to the base, next to the
                                                           # control: loop_flow_target_paraphrased.md

Every mode uses zoo:digits-sd3 (a tiny StableDiffusion3Pipeline), guidance 1, 10 steps, the SDE
sampler with noise level 0.7 on every step, full fine-tuning of the transformer, clip 1e-4, AdamW
(ε 1e-8), reward digits_alignment, 32 images per round (``BASE`` below: K = 4 × 8 prompts, sampled
16 at a time, minibatches of 16 samples × all 10 steps, one inner epoch).

``--speed`` runs in this one process, one torch thread, ``--repeats`` times: a fresh run of each of
(a) rlprox: ``Engine(load_recipe(BASE)).fit()`` and (b) ``NaiveFlowGRPO``, ``--rounds`` timed rounds
after one warm-up round, interleaved round by round (a, b, a, b, ...; every other repeat b first).
``NaiveFlowGRPO`` is a loop with the structure of Flow-GRPO's scripts/train_sd3.py (prompts
re-encoded per sampling batch through the pipeline's ``encode_prompt``, a pipeline-style sampling
loop that decodes in the main thread, rewards submitted to a thread pool while the next batch
samples, per-prompt advantages over the gathered rewards, then per minibatch and per timestep a
forward, the log-prob, the clipped loss and ``accelerator.backward`` under
``accelerator.accumulate``, the optimizer stepping once per minibatch). Both call
``rlprox.models.flow_match.sde_step_with_logprob`` for the step's math. The phases are timed with
``time.perf_counter`` (rlprox: its trainer's methods wrapped from outside; no library change).
``NaiveFlowGRPO`` is also the baseline of ``benchmarks/gpu_smoke.py --case flow`` (on a GPU, with LoRA, bf16,
another reward and image size: its keyword arguments; ``--speed`` uses the defaults).

The science mode trains each arm with ``rlprox train`` in a fresh process (``--parallel`` at a
time) and evaluates its last checkpoint with ``rlprox eval`` on a fixed set (``--eval-size`` items,
item i: prompt i mod 50 with noise seeded by i; the same set for every run) under the
digits_alignment reward, with the trained SDE sampler and the ODE:

    LOOP       advantage loo, K = 4, 8 prompts per round
    GRPO       advantage group_norm, K = 4, 8 prompts
    DDPO       advantage prompt_stats, K = 1, 32 i.i.d. prompts (the same 32 images per round)
    batch-norm advantage batch_norm, K = 4, 8 prompts
    control    LOOP on ``uniform_reward``: uniform scores that carry no information about the image

Each arm gets every lr of ``--lrs`` and every seed; the best lr of an arm is the one with the
highest seed mean of the final eval alignment (SDE). Writes the table (all cells, the best lr per
arm, paired same-seed differences vs LOOP and vs control with Student-t 95% intervals) to ``--out``
and the training-reward curves (best lr per arm, mean over seeds) next to it as a PNG.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
import stats  # noqa: E402
from harness import mean_sd  # noqa: E402

ROOT = harness.ROOT
RESULTS = ROOT / "benchmarks" / "results"
PIPELINE = "zoo:digits-sd3"
TARGET_RECIPE = "recipes/loop/digits-sd3-alignment.yaml"  # the shipped recipe (--target)
CONTROL_REWARD = "benchmarks.loop_flow:uniform_reward"
EVAL_SEED = 777  # the fixed evaluation set's noise seed, the same for every run
# the recipe every mode starts from; loop.pipeline is filled in by base_recipe()
BASE = {
    "algo": "loop",
    "seed": 1,
    "run": {"name": "loop-flow", "iterations": 200, "eval_size": 0, "save_every": 0},
    "loop": {
        "pipeline": PIPELINE,
        "prompts": "digits",
        "num_samples_per_prompt": 4,
        "prompts_per_iteration": 8,
        "num_steps": 10,
        "sampling": {"sampler": "sde", "noise_level": 0.7},
        "max_sequence_length": 8,  # as the shipped recipe: digits-sd3's T5 outputs zeros
        "guidance_scale": 1.0,
        "sample_batch_size": 16,
        "advantage": "loo",
        "adv_clip": 5.0,
        "clip_coef": 1.0e-4,
        "update_epochs": 1,
        "minibatch_size": 16,
        "timestep_fraction": 1.0,
        "finetune": "full",
    },
    "reward": {"name": "digits_alignment"},
    "optim": {"name": "adamw", "lr": 1.0e-4, "eps": 1.0e-8, "weight_decay": 1.0e-4, "max_grad_norm": 1.0},
}
ARMS = {
    "loop": ("LOOP (loo, K = 4)", ["loop.advantage=loo"]),
    "grpo": ("GRPO (group_norm, K = 4)", ["loop.advantage=group_norm"]),
    "ddpo": (
        "DDPO (prompt_stats, K = 1, 32 prompts)",
        ["loop.advantage=prompt_stats", "loop.num_samples_per_prompt=1", "loop.prompts_per_iteration=32"],
    ),
    "batchnorm": ("batch-norm (batch_norm, K = 4)", ["loop.advantage=batch_norm"]),
    "control": ("control (LOOP, uniform random reward)", ["loop.advantage=loo", f"reward.name={CONTROL_REWARD}"]),
}


def uniform_reward(images, prompts: list[str], metadata: list[dict]):
    """Control reward: a uniform score in [0, 1) per sample from a SHA-256 of its prompt and pixels,
    so it is i.i.d. noise that carries no information about alignment (and is reproducible); the
    info logs the true digits_alignment of the batch as ``reward/alignment``."""
    import hashlib

    import torch

    from rlprox.rewards import digits_alignment

    scores = []
    for image, prompt in zip(images, prompts):
        digest = hashlib.sha256(prompt.encode() + image.detach().float().cpu().numpy().tobytes()).digest()
        scores.append(int.from_bytes(digest[:8], "little") / 2**64)
    alignment, _ = digits_alignment(images, prompts, metadata)
    return torch.tensor(scores), {"alignment": float(alignment.float().mean())}


def base_recipe() -> dict:
    """``BASE`` with the local folder of zoo:digits-sd3 as the pipeline (built on first use): this
    branch's recipe check takes only zoo:digits-sd for loop.pipeline, a folder is read by its class."""
    from rlprox.zoo.build import resolve_path

    recipe = copy.deepcopy(BASE)
    recipe["loop"]["pipeline"] = str(resolve_path(PIPELINE))
    return recipe


# ============================================================================ speed


class Phases:
    """Seconds per phase, one dict per round; ``wrap`` times a callable into the current round."""

    def __init__(self):
        self.rounds: list[collections.defaultdict] = []

    def new_round(self):
        self.rounds.append(collections.defaultdict(float))

    def add(self, key: str, seconds: float):
        self.rounds[-1][key] += seconds

    def wrap(self, key: str, fn, starts_round: bool = False):
        def timed(*args, **kwargs):
            if starts_round:
                self.new_round()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(key, time.perf_counter() - start)

        return timed


def instrument(engine, phases: Phases) -> None:
    """Time the engine's phases from outside (no library change): collect (sampling + waiting for
    the scorer) with its prompt encoding and denoising, the worker thread's decode + score, the
    advantages, the update and its loss calls."""
    algo = engine.algo
    algo.collect = phases.wrap("collect", algo.collect, starts_round=True)
    algo._embed = phases.wrap("encode", algo._embed)
    algo.adapter.sample = phases.wrap("sample", algo.adapter.sample)
    algo._score = phases.wrap("score_worker", algo._score)
    algo.advantages = phases.wrap("advantages", algo.advantages)
    algo.loss = phases.wrap("loss_forward", algo.loss)
    engine.update = phases.wrap("update", engine.update)


def rlprox_phases(phases: Phases, seconds: list[float]) -> list[dict]:
    out = []
    for p, total in zip(phases.rounds, seconds):
        row = {
            "encode": p["encode"],
            "sample": p["sample"],
            "wait": p["collect"] - p["encode"] - p["sample"],
            "advantages": p["advantages"],
            "forward": p["loss_forward"],
            "backward_step": p["update"] - p["loss_forward"],
        }
        row["other"] = total - sum(row.values())
        row["score_worker"] = p["score_worker"]
        out.append(row)
    return out


def interleaved_repeat(
    recipe: dict, naive: "NaiveFlowGRPO", rounds: int, out: Path, name: str, naive_first: bool, extra=()
):
    """One fresh rlprox run (``Engine(load_recipe(recipe)).fit()``, ``rounds`` + 1 iterations) and one
    fresh naive run of as many rounds, interleaved round by round: a naive round runs after each rlprox
    iteration is logged (outside its perf/iteration_s), or before it when ``naive_first``. The first round
    of each is the warm-up. Returns {"rlprox": (seconds, phases), "naive": (seconds, phases)} of the timed
    rounds."""
    from rlprox.engine import Engine
    from rlprox.recipe import load_recipe

    total = rounds + 1
    overrides = [f"run.iterations={total}", f"run.output_dir={out}", f"run.name={name}", *harness.QUIET, *extra]
    engine = Engine(load_recipe(recipe, overrides))
    phases = Phases()
    instrument(engine, phases)
    naive.reset()  # after the engine's accelerator: both share accelerate's gradient state (10 steps each)
    naive_seconds = []
    log = engine.tracker.log

    def log_then_naive(*args, **kwargs):
        log(*args, **kwargs)
        if len(naive_seconds) < total:
            naive_seconds.append(naive.round())

    engine.tracker.log = log_then_naive
    if naive_first:
        naive_seconds.append(naive.round())
    try:
        engine.fit()
    finally:
        engine.close()
    rows = [json.loads(line) for line in (engine.run_dir / "metrics.jsonl").read_text().splitlines()]
    seconds = [r["perf/iteration_s"] for r in rows]
    return {
        "rlprox": (seconds[1:], rlprox_phases(phases, seconds)[1:]),
        "naive": (naive_seconds[1:], [dict(p) for p in naive.phases.rounds[1:]]),
    }


class NaiveFlowGRPO:
    """One process's training loop with the structure of Flow-GRPO's scripts/train_sd3.py (SD3, no
    EMA, no KL term, no CFG at train time), written plainly: the baseline of ``--speed`` and of
    ``benchmarks/gpu_smoke.py --case flow``. Same model, batch sizes, optimizer settings and step math
    (rlprox.models.flow_match.sde_step_with_logprob).

    ``cfg`` holds the loop section's keys (num_steps, num_samples_per_prompt, prompts_per_iteration,
    sample_batch_size, minibatch_size, sampling.noise_level, max_sequence_length, adv_clip, clip_coef and, when
    set, resolution: the image side in pixels, else the pipeline's default), ``optim`` the optimizer's
    (lr, weight_decay, eps, max_grad_norm, betas). The defaults are ``--speed``'s: full fine-tuning in
    float32 on the CPU. ``lora_rank``: train only LoRA adapters (peft ``add_adapter`` with rlprox's
    LoraConfig: ``lora_alpha``, gaussian init, ``StableDiffusion3Adapter.lora_targets``) on a frozen base.
    ``mixed_precision`` "bf16": the transformer calls run under accelerate's autocast and the frozen
    weights (the LoRA base, VAE, text encoders) are cast to bfloat16, like rlprox's ``run.frozen_dtype``
    bfloat16; latents, log-probs and the trained weights stay float32."""

    def __init__(
        self,
        path: str,
        cfg: dict,
        optim: dict,
        seed: int,
        device: str = "cpu",
        lora_rank: int | None = None,
        lora_alpha: float | None = None,
        mixed_precision: str = "no",
        reward: str = "digits_alignment",
    ):
        import diffusers
        import numpy as np
        import torch
        from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

        from rlprox.algos.loop import load_prompts
        from rlprox.rewards import build_reward

        if mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be 'no' or 'bf16' (got {mixed_precision!r})")
        diffusers.utils.logging.disable_progress_bar()
        self.cfg, self.optim_cfg = cfg, optim
        self.device = torch.device(device)
        self.mixed_precision, self.lora = mixed_precision, lora_rank is not None
        # a folder saved without T5 (text_encoder_3 = None) lists it as [null, null]: pass None for it
        index = DiffusionPipeline.load_config(str(path))
        absent = {k: None for k, v in index.items() if isinstance(v, list) and list(v) == [None, None]}
        self.pipe = pipe = StableDiffusion3Pipeline.from_pretrained(str(path), **absent)
        pipe.set_progress_bar_config(disable=True)
        frozen_dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float32
        for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
            if (module := getattr(pipe, name, None)) is not None:
                module.requires_grad_(False).to(frozen_dtype)
        self.transformer = pipe.transformer
        if self.lora:
            from peft import LoraConfig

            from rlprox.models.pipelines.sd3 import StableDiffusion3Adapter

            self.transformer.requires_grad_(False)
            self.transformer.add_adapter(
                LoraConfig(
                    r=lora_rank,
                    lora_alpha=lora_alpha if lora_alpha is not None else lora_rank,
                    target_modules=list(StableDiffusion3Adapter.lora_targets),
                    init_lora_weights="gaussian",
                )
            )
            for p in self.transformer.parameters():
                if not p.requires_grad:  # the frozen base; the adapters stay float32
                    p.data = p.data.to(frozen_dtype)
        trained = {n for n, p in self.transformer.named_parameters() if p.requires_grad} if self.lora else None
        # the trained weights' start, kept on the CPU (off the GPU's memory)
        self.initial = {
            k: v.detach().to("cpu", copy=True)
            for k, v in self.transformer.state_dict().items()
            if trained is None or k in trained
        }
        pipe.to(self.device)
        self.reward_fn = build_reward(reward)
        self.prompts, self.metadata = load_prompts("digits")
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=8)  # as train_sd3.py
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.phases = Phases()

    def reset(self):
        """Base weights, a fresh optimizer and accelerator: a new run."""
        import torch
        from accelerate import Accelerator

        self.phases = Phases()
        self.transformer = self.pipe.transformer
        self.transformer.load_state_dict(self.initial, strict=not self.lora)
        if not self.lora:
            self.transformer.requires_grad_(True)
        params = [p for p in self.transformer.parameters() if p.requires_grad]
        o = self.optim_cfg
        optimizer = torch.optim.AdamW(
            params, lr=o["lr"], betas=tuple(o.get("betas", (0.9, 0.999))), weight_decay=o["weight_decay"], eps=o["eps"]
        )
        # as train_sd3.py: every trained timestep of a minibatch is one accumulation step
        self.accelerator = Accelerator(
            cpu=self.device.type == "cpu",
            mixed_precision=self.mixed_precision,
            gradient_accumulation_steps=self.cfg["num_steps"],
        )
        self.transformer, self.optimizer = self.accelerator.prepare(self.transformer, optimizer)

    # ------------------------------------------------------------------ sampling
    def next_prompts(self):
        """train_sd3.py's K-repeat sampler: batch/K distinct prompts, each K times, shuffled."""
        import numpy as np

        k, n = self.cfg["num_samples_per_prompt"], self.cfg["sample_batch_size"]
        chosen = self.rng.choice(len(self.prompts), n // k, replace=False)
        order = self.rng.permutation(np.repeat(chosen, k))
        return [self.prompts[i] for i in order], [self.metadata[i] for i in order]

    def pipeline_with_logprob(self, prompt_embeds, pooled_prompt_embeds):
        """The pipeline's sampling loop with a log-prob per step: (images, latents list, log-prob list)."""
        import torch

        from rlprox.models.flow_match import sde_step_with_logprob

        pipe, cfg = self.pipe, self.cfg
        batch = prompt_embeds.shape[0]
        size = cfg.get("resolution") or pipe.default_sample_size * pipe.vae_scale_factor
        latents = pipe.prepare_latents(
            batch,
            pipe.transformer.config.in_channels,
            size,
            size,
            torch.float32,  # latents in float32 (the transformer runs under autocast with mixed precision)
            self.device,
            self.generator,
        )
        pipe.scheduler.set_timesteps(cfg["num_steps"], device=self.device)
        all_latents, all_log_probs = [latents], []
        for t in pipe.scheduler.timesteps:
            with self.accelerator.autocast():
                noise_pred = self.transformer(
                    hidden_states=latents,
                    timestep=t.expand(batch),
                    encoder_hidden_states=prompt_embeds,
                    pooled_projections=pooled_prompt_embeds,
                    return_dict=False,
                )[0]
            i = pipe.scheduler.index_for_timestep(t)
            sigma, sigma_next = pipe.scheduler.sigmas[i], pipe.scheduler.sigmas[i + 1]
            latents, log_prob = sde_step_with_logprob(
                noise_pred.float(),
                latents.float(),
                sigma,
                sigma_next,
                cfg["sampling"]["noise_level"],
                generator=self.generator,
            )
            all_latents.append(latents)
            all_log_probs.append(log_prob)
        latents = latents / pipe.vae.config.scaling_factor + (pipe.vae.config.shift_factor or 0.0)
        image = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
        image = pipe.image_processor.postprocess(image.float(), output_type="pt")
        return image, all_latents, all_log_probs

    def scored(self, images, prompts, metadata):
        start = time.perf_counter()
        try:
            return self.reward_fn(images, prompts, metadata)
        finally:
            self.phases.add("score_worker", time.perf_counter() - start)

    # ------------------------------------------------------------------ one round
    def round(self):
        import numpy as np
        import torch

        cfg, pipe, phases = self.cfg, self.pipe, self.phases
        phases.new_round()
        t_round = time.perf_counter()
        T, K = cfg["num_steps"], cfg["num_samples_per_prompt"]
        images_per_round = K * cfg["prompts_per_iteration"]
        # ---- SAMPLING
        self.transformer.eval()
        samples = []
        for _ in range(images_per_round // cfg["sample_batch_size"]):
            prompts, metadata = self.next_prompts()
            t0 = time.perf_counter()
            with torch.no_grad():
                prompt_embeds, _, pooled_prompt_embeds, _ = pipe.encode_prompt(
                    prompt=prompts,
                    prompt_2=None,
                    prompt_3=None,
                    device=self.device,
                    do_classifier_free_guidance=False,
                    max_sequence_length=cfg["max_sequence_length"],
                )
            t1 = time.perf_counter()
            with torch.no_grad():
                images, latents, log_probs = self.pipeline_with_logprob(prompt_embeds, pooled_prompt_embeds)
            latents = torch.stack(latents, dim=1)  # (batch, T + 1, C, H, W)
            log_probs = torch.stack(log_probs, dim=1)  # (batch, T)
            timesteps = pipe.scheduler.timesteps.repeat(len(prompts), 1)  # (batch, T)
            rewards = self.executor.submit(self.scored, images, prompts, metadata)
            time.sleep(0)  # let the reward computation start
            samples.append(
                {
                    "prompts": prompts,
                    "prompt_embeds": prompt_embeds,
                    "pooled_prompt_embeds": pooled_prompt_embeds,
                    "timesteps": timesteps,
                    "latents": latents[:, :-1],
                    "next_latents": latents[:, 1:],
                    "log_probs": log_probs,
                    "rewards": rewards,
                }
            )
            t2 = time.perf_counter()
            phases.add("encode", t1 - t0)
            phases.add("sample", t2 - t1)
        # ---- wait for the rewards, collate
        t0 = time.perf_counter()
        for sample in samples:
            sample["rewards"] = sample["rewards"].result()[0].float().cpu()
        phases.add("wait", time.perf_counter() - t0)
        prompts = [p for s in samples for p in s.pop("prompts")]
        samples = {k: torch.cat([s[k] for s in samples]) for k in samples[0]}
        # ---- per-prompt leave-one-out advantages over all gathered rewards, repeated over the steps
        t0 = time.perf_counter()
        rewards = samples.pop("rewards").numpy()
        advantages = np.zeros_like(rewards)
        for prompt in set(prompts):
            idx = [i for i, p in enumerate(prompts) if p == prompt]
            group = rewards[idx]
            advantages[idx] = group - (group.sum() - group) / max(len(group) - 1, 1)
        samples["advantages"] = torch.as_tensor(advantages, device=self.device)[:, None].repeat(1, T)
        phases.add("advantages", time.perf_counter() - t0)
        # ---- TRAINING
        total = len(prompts)
        perm = torch.randperm(total, generator=self.generator, device=self.device)
        samples = {k: v[perm] for k, v in samples.items()}
        batched = {k: v.reshape(-1, cfg["minibatch_size"], *v.shape[1:]) for k, v in samples.items()}
        batched = [dict(zip(batched, x)) for x in zip(*batched.values())]
        self.transformer.train()
        info = collections.defaultdict(list)
        for sample in batched:
            for j in range(T):
                with self.accelerator.accumulate(self.transformer):
                    t0 = time.perf_counter()
                    log_prob = self.compute_log_prob(sample, j)
                    advantages = torch.clamp(sample["advantages"][:, j], -cfg["adv_clip"], cfg["adv_clip"])
                    ratio = torch.exp(log_prob - sample["log_probs"][:, j])
                    unclipped_loss = -advantages * ratio
                    clipped_loss = -advantages * torch.clamp(ratio, 1.0 - cfg["clip_coef"], 1.0 + cfg["clip_coef"])
                    loss = torch.mean(torch.maximum(unclipped_loss, clipped_loss))
                    info["approx_kl"].append(0.5 * torch.mean((log_prob - sample["log_probs"][:, j]) ** 2))
                    info["clipfrac"].append(torch.mean((torch.abs(ratio - 1.0) > cfg["clip_coef"]).float()))
                    info["loss"].append(loss)
                    t1 = time.perf_counter()
                    self.accelerator.backward(loss)
                    if self.accelerator.sync_gradients:
                        max_norm = self.optim_cfg["max_grad_norm"]
                        self.accelerator.clip_grad_norm_(self.transformer.parameters(), max_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                    t2 = time.perf_counter()
                phases.add("forward", t1 - t0)
                phases.add("backward_step", t2 - t1)
                if self.accelerator.sync_gradients:  # an optimizer step: log the minibatch's means
                    self.logged = {k: torch.mean(torch.stack(v)).item() for k, v in info.items()}
                    info = collections.defaultdict(list)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the round's queued GPU work belongs to its time
        seconds = time.perf_counter() - t_round
        r = phases.rounds[-1]
        r["other"] = seconds - sum(v for k, v in r.items() if k not in ("score_worker", "other"))
        return seconds

    def compute_log_prob(self, sample, j):
        """train_sd3.py's compute_log_prob without CFG: the transformer at step j, then the step's log-prob."""
        from rlprox.models.flow_match import sde_step_with_logprob

        scheduler = self.pipe.scheduler
        with self.accelerator.autocast():
            noise_pred = self.transformer(
                hidden_states=sample["latents"][:, j],
                timestep=sample["timesteps"][:, j],
                encoder_hidden_states=sample["prompt_embeds"],
                pooled_projections=sample["pooled_prompt_embeds"],
                return_dict=False,
            )[0]
        step_index = [scheduler.index_for_timestep(t) for t in sample["timesteps"][:, j]]
        sigma = scheduler.sigmas[step_index]
        sigma_next = scheduler.sigmas[[i + 1 for i in step_index]]
        _, log_prob = sde_step_with_logprob(
            noise_pred.float(),
            sample["latents"][:, j].float(),
            sigma,
            sigma_next,
            self.cfg["sampling"]["noise_level"],
            prev_sample=sample["next_latents"][:, j].float(),
        )
        return log_prob


PHASES = [
    ("encode", "prompt encoding", "rlprox: the round's 8 distinct prompts once; naive: every sampling batch's 16"),
    ("sample", "sampling", "10 SDE steps with log-probs (naive: + VAE decode in the main thread)"),
    ("wait", "reward wait", "main thread blocked on the scoring thread (rlprox: decode + score there)"),
    ("advantages", "advantages", "leave-one-out per prompt group"),
    ("forward", "log-prob recompute forward", "transformer forward + step log-prob + clipped loss, 20 per round"),
    ("backward_step", "backward + optimizer", "backward of those 20, clip, AdamW step once per minibatch (2)"),
    ("other", "other", "collation, shuffling, bookkeeping"),
]


def speed(args) -> None:
    import torch

    torch.set_num_threads(1)
    recipe = base_recipe()
    cfg = dict(recipe["loop"])
    cfg.setdefault("max_sequence_length", 256)  # the same T5 length for both loops
    naive = NaiveFlowGRPO(cfg["pipeline"], cfg, recipe["optim"], seed=recipe["seed"])
    images = cfg["num_samples_per_prompt"] * cfg["prompts_per_iteration"]
    out = Path(tempfile.mkdtemp(prefix="loop_flow_speed_"))
    results = {"rlprox": [], "naive": []}
    for rep in range(args.repeats):
        # rounds alternate rlprox, naive, rlprox, ...; every other repeat starts with naive (ABBA against drift)
        both = interleaved_repeat(
            recipe, naive, args.rounds, out, f"rlprox-{rep}", naive_first=rep % 2 == 1, extra=args.set
        )
        for which, (seconds, phases) in both.items():
            ips = images * len(seconds) / sum(seconds)
            results[which].append({"seconds": seconds, "phases": phases, "images_per_s": ips})
            print(f"repeat {rep + 1} {which}: {ips:.2f} images/s ({', '.join(f'{s:.2f}' for s in seconds)} s)")
    naive.executor.shutdown()
    (out / "speed.json").write_text(json.dumps(results))
    print(f"raw timings: {out / 'speed.json'}")
    text = speed_table(results, args, images, cfg["max_sequence_length"])
    print(text)
    Path(args.speed_out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.speed_out).write_text(text)


def speed_table(results: dict, args, images: int, t5_len: int) -> str:
    import torch

    rl = [r["images_per_s"] for r in results["rlprox"]]
    nv = [r["images_per_s"] for r in results["naive"]]
    ratios = [a / b for a, b in zip(rl, nv)]

    def phase(which, key):  # median over repeats of the mean seconds per timed round
        return statistics.median(statistics.mean(p.get(key, 0.0) for p in r["phases"]) for r in results[which])

    def spread(values):
        return f"{min(values):.2f}–{max(values):.2f}"

    def shown_path(path):  # relative to the repository when inside it (a path outside, e.g. /tmp, as given)
        resolved = Path(path).resolve()
        return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)

    default_out = shown_path(RESULTS / "loop_flow_speed.md")
    lines = [
        "# LOOP on digits-sd3: rlprox vs a naive Flow-GRPO-style loop, images/s on CPU",
        "",
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs (shared), python "
        f"{platform.python_version()}, torch {torch.__version__}; "
        f"`python benchmarks/loop_flow.py --speed --rounds {args.rounds} --repeats {args.repeats}"
        + "".join(f" --set {s}" for s in args.set)
        + (f" --speed-out {shown_path(args.speed_out)}" if shown_path(args.speed_out) != default_out else "")
        + "`"
        + (f" (rlprox only: {', '.join(args.set)})" if args.set else "")
        + ".",
        "",
        f"One process, one torch thread; zoo:digits-sd3, full fine-tuning of the transformer, guidance 1, 10 steps, "
        f"SDE (noise level 0.7) on every step, K = 4 × 8 prompts = {images} images per round sampled 16 at a time, "
        "minibatches of 16 samples × 10 steps (2 AdamW steps per round, lr 1e-4, ε 1e-8), clip 1e-4, "
        f"digits_alignment, T5 length {t5_len} for both. "
        f"Each repeat is a fresh rlprox run and a fresh naive run of {args.rounds} + 1 rounds, interleaved round by "
        "round (every other repeat starts with the naive round), the first round of each not timed; a run's images/s "
        "= images / summed round seconds (rlprox: the engine's perf/iteration_s, collect + update; naive: the whole "
        "round). rlprox = `Engine(load_recipe(BASE)).fit()`; naive = "
        "`NaiveFlowGRPO` in benchmarks/loop_flow.py (the structure of Flow-GRPO's scripts/train_sd3.py).",
        "",
        "| loop | images/s, median | min–max | per repeat |",
        "|---|---|---|---|",
        f"| rlprox (Engine) | **{statistics.median(rl):.2f}** | {spread(rl)} | {', '.join(f'{v:.2f}' for v in rl)} |",
        f"| naive (Flow-GRPO structure) | **{statistics.median(nv):.2f}** | {spread(nv)} | "
        f"{', '.join(f'{v:.2f}' for v in nv)} |",
        f"| ratio rlprox / naive (same repeat) | **{statistics.median(ratios):.2f}×** | {spread(ratios)} | "
        f"{', '.join(f'{v:.2f}' for v in ratios)} |",
        "",
        "Where a round goes: seconds per round (median over repeats of the mean over timed rounds).",
        "",
        "| phase | rlprox s | naive s | naive − rlprox | what |",
        "|---|---|---|---|---|",
    ]
    diffs = {}
    for key, label, what in PHASES:
        a, b = phase("rlprox", key), phase("naive", key)
        diffs[label] = b - a
        lines.append(f"| {label} | {a:.3f} | {b:.3f} | {b - a:+.3f} | {what} |")
    a_total = statistics.median(statistics.mean(r["seconds"]) for r in results["rlprox"])
    b_total = statistics.median(statistics.mean(r["seconds"]) for r in results["naive"])
    lines.append(f"| **round** | **{a_total:.3f}** | **{b_total:.3f}** | {b_total - a_total:+.3f} | |")
    a, b = phase("rlprox", "score_worker"), phase("naive", "score_worker")
    lines.append(
        f"| (scoring thread, overlapped) | {a:.3f} | {b:.3f} | {b - a:+.3f} | "
        "rlprox: VAE decode + reward; naive: reward |"
    )
    ratio = statistics.median(ratios)
    compute = sum(phase("rlprox", k) for k in ("sample", "forward", "backward_step"))
    gains = sorted(diffs.items(), key=lambda kv: -kv[1])
    saves = ", ".join(f"{k} {v:+.3f} s" for k, v in gains if v > 0.005) or "none"
    costs = ", ".join(f"{k} {-v:+.3f} s" for k, v in gains[::-1] if v < -0.005) or "none"
    lines += [
        "",
        f"Target rlprox ≥ 1.2× the naive loop on CPU: **{'met' if ratio >= 1.2 else 'not met'}** "
        f"({ratio:.2f}×). Per round rlprox saves: {saves}; rlprox costs more: {costs}. Sampling, the "
        f"log-prob forward and the backward are {100 * compute / a_total:.1f}% of rlprox's round, and they are the "
        "same transformer calls on the same batch shapes in both loops: the measured gap is in small costs in and "
        "around those calls, while 1.2× would need an rlprox round "
        f"{a_total - b_total / 1.2:.2f} s ({100 * (1 - b_total / 1.2 / a_total):.0f}%) shorter.",
        "",
    ]
    return "\n".join(lines) + "\n"


# ============================================================================ science


def science_run(arm: str, lr: float, seed: int, args, recipe_file: Path, runs: Path) -> dict:
    label, overrides = ARMS[arm]
    name = f"{arm}-lr{lr:g}-s{seed}"
    overrides = [*overrides, *args.set, f"seed={seed}", f"optim.lr={lr}", f"run.iterations={args.iterations}"]
    rows, ev = harness.train_and_eval(
        str(recipe_file),
        [*overrides, "run.overwrite=true"],
        runs,
        name,
        ["--num-samples", str(args.eval_size), "--seed", str(EVAL_SEED)],
        reuse=True,
        eval_overrides=["reward=digits_alignment"],  # the control trained on noise; every arm is judged on this
    )
    key = "reward/alignment" if arm == "control" else "reward/mean"
    return {
        "arm": arm,
        "lr": lr,
        "seed": seed,
        "name": name,
        "minutes": sum(r["perf/iteration_s"] for r in rows) / 60,
        "images": rows[-1]["progress/images"],
        "base": ev["eval/base_reward"],
        "tuned": ev["eval/reward"],
        "base_ode": ev["eval/base_reward_ode"],
        "tuned_ode": ev["eval/reward_ode"],
        "curve": [(r["progress/images"], r[key]) for r in rows],
    }


def paired(results: dict, arm: str, best: dict, other: str) -> str:
    """Mean same-seed difference of ``arm`` − ``other`` (each at its best lr) with its Student-t 95% interval."""
    if other not in best or arm == other:
        return "—"
    mine = {r["seed"]: r["tuned"] for r in results[(arm, best[arm])]}
    theirs = {r["seed"]: r["tuned"] for r in results[(other, best[other])]}
    return stats.paired(mine[s] - theirs[s] for s in sorted(mine) if s in theirs).format(3)


def science(args) -> None:
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        sys.exit(f"--arms: unknown {', '.join(unknown)} (choose from {', '.join(ARMS)})")
    lrs = [float(x) for x in args.lrs.split(",")]
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    import yaml

    recipe_file = runs / "base.yaml"  # the arms' base recipe, as `rlprox train` reads it
    recipe_file.write_text(yaml.safe_dump(base_recipe(), sort_keys=False))
    jobs = [(a, lr, s) for s in range(1, args.seeds + 1) for lr in lrs for a in arms]
    results: dict[tuple, list] = {}
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        futures = {pool.submit(science_run, a, lr, s, args, recipe_file, runs): (a, lr) for a, lr, s in jobs}
        for fut in concurrent.futures.as_completed(futures):
            res = fut.result()
            results.setdefault(futures[fut], []).append(res)
            print(
                f"{res['name']}: SDE {res['base']:.3f} -> {res['tuned']:.3f}, ODE {res['base_ode']:.3f} -> "
                f"{res['tuned_ode']:.3f}, {res['minutes']:.1f} min",
                flush=True,
            )
    for runs_ in results.values():
        runs_.sort(key=lambda r: r["seed"])
    best = {
        arm: max(lrs, key=lambda lr: statistics.mean(r["tuned"] for r in results[(arm, lr)]))
        for arm in arms
        if all((arm, lr) in results for lr in lrs)
    }
    out = Path(args.out or RESULTS / "loop_flow.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    plot(results, best, png)
    text = science_table(results, best, arms, lrs, args, png)
    print(text)
    out.write_text(text)


def science_table(results: dict, best: dict, arms: list[str], lrs: list[float], args, png: Path) -> str:
    first = next(iter(results.values()))[0]
    lines = [
        "# LOOP vs GRPO vs DDPO vs batch-norm vs a random-reward control: digits alignment on digits-sd3",
        "",
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs (shared), python "
        f"{platform.python_version()}; `python benchmarks/loop_flow.py --arms {','.join(arms)} --seeds {args.seeds} "
        f"--lrs {args.lrs} --iterations {args.iterations} --eval-size {args.eval_size} --parallel {args.parallel}"
        + "".join(f" --set {s}" for s in args.set)
        + "`.",
        "",
        f"Each run: {args.iterations} rounds × 32 images = {int(first['images']):,} images sampled (DDPO: 32 "
        "prompts × K = 1, the others 8 prompts × K = 4), zoo:digits-sd3, guidance 1, 10 steps, SDE (noise level 0.7) "
        "on every step, full transformer, AdamW ε 1e-8, clip 1e-4, 1 torch thread, one process "
        f"({args.parallel} at a time). Alignment = digits_alignment on a fixed evaluation set ({args.eval_size} "
        "items: prompt i mod 50, noise seeded by i, the same for every run), base → tuned, with the trained SDE "
        "sampler and with the ODE; the control arm trains on uniform noise scores and is evaluated on "
        "digits_alignment like the others. mean ± std over seeds.",
        "",
        "## Every cell",
        "",
        "| arm | lr | seeds | SDE: base → tuned | Δ SDE | ODE: base → tuned | Δ ODE | minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        for lr in lrs:
            runs = results.get((arm, lr))
            if not runs:
                continue
            d = [r["tuned"] - r["base"] for r in runs]
            d0 = [r["tuned_ode"] - r["base_ode"] for r in runs]
            mark = " (best)" if best.get(arm) == lr else ""
            lines.append(
                f"| {ARMS[arm][0]} | {lr:g}{mark} | {len(runs)} | {mean_sd([r['base'] for r in runs])} → "
                f"{mean_sd([r['tuned'] for r in runs])} | **{mean_sd(d)}** | "
                f"{mean_sd([r['base_ode'] for r in runs])} → {mean_sd([r['tuned_ode'] for r in runs])} | "
                f"{mean_sd(d0)} | {statistics.mean(r['minutes'] for r in runs):.1f} |"
            )
    lines += [
        "",
        "## Best lr per arm (highest seed mean of the tuned SDE alignment)",
        "",
        "Paired differences: tuned SDE alignment of the arm minus that of LOOP / of the control, both at their best "
        "lr, same seed, mean [Student-t 95% interval over seeds], the per-seed differences and the minimum "
        "detectable effect at 80% power (MDE); fewer than 5 seeds: exploratory.",
        "",
        "| arm | best lr | tuned SDE | Δ SDE | tuned ODE | − LOOP | − control |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        if arm not in best:
            continue
        runs = results[(arm, best[arm])]
        lines.append(
            f"| {ARMS[arm][0]} | {best[arm]:g} | {mean_sd([r['tuned'] for r in runs])} | "
            f"**{mean_sd([r['tuned'] - r['base'] for r in runs])}** | {mean_sd([r['tuned_ode'] for r in runs])} | "
            f"{paired(results, arm, best, 'loop')} | {paired(results, arm, best, 'control')} |"
        )
    lines += ["", "Per run (Δ SDE / Δ ODE / minutes):", ""]
    for arm in arms:
        for lr in lrs:
            runs = results.get((arm, lr))
            if runs:
                lines.append(
                    f"- {ARMS[arm][0]}, lr {lr:g}: "
                    + ", ".join(
                        f"seed {r['seed']}: {r['tuned'] - r['base']:+.3f} / {r['tuned_ode'] - r['base_ode']:+.3f} / "
                        f"{r['minutes']:.1f} min"
                        for r in runs
                    )
                )
    lines += ["", f"![training reward vs images sampled, best lr per arm]({png.name})", ""]
    return "\n".join(lines) + "\n"


def plot(results: dict, best: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for arm, lr in best.items():
        runs = results[(arm, lr)]
        n = min(len(r["curve"]) for r in runs)
        x = np.array([p[0] for p in runs[0]["curve"][:n]])
        y = np.mean([[p[1] for p in r["curve"][:n]] for r in runs], axis=0)
        k = max(1, n // 20)  # moving average over ~5% of the run
        y = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(x[k - 1 :], y, label=f"{ARMS[arm][0]}, lr {lr:g}", linestyle="--" if arm == "control" else "-")
    ax.set_xlabel("images sampled")
    ax.set_ylabel("training digits_alignment (SDE samples)")
    ax.set_title("digits-sd3, mean over seeds (control: its true alignment, trained on noise)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ============================================================================ target


# --target: the recipe as it was shipped until 2026-12-06 (the 50 training prompts, 80 rounds, in-run evaluation
# of all 50 prompts x 2 noises); since then it trains on digits-paraphrased (--target-paraphrased measures it)
TRAINING_PROMPTS = [
    "loop.prompts=digits",
    "loop.eval_prompts=digits",
    "run.iterations=80",
    "run.save_every=20",
    "run.eval_every=40",
    "run.eval_size=100",
]


def target(args) -> None:
    if not (ROOT / TARGET_RECIPE).is_file():
        sys.exit(
            f"--target: {TARGET_RECIPE} does not exist in this tree: it is the shipped digits-sd3 LOOP recipe, "
            "not written yet (or not merged into this branch)"
        )
    harness.target_check(
        TARGET_RECIPE,
        args.seeds,
        RESULTS / "loop_flow_target.md",
        title="# LOOP on digits-sd3, the shipped recipe on 2 CPU processes: does SDE alignment rise by ≥ 0.15 "
        "within 20 minutes?",
        command=f"python benchmarks/loop_flow.py --target --seeds {args.seeds}",
        setup=f"{TARGET_RECIPE} under `torchrun --nproc_per_node 2`, on the 50 training prompts at its length "
        f"before 2026-12-06 ({' '.join(TRAINING_PROMPTS)}); minutes = summed iteration wall time (training and the "
        "in-run evaluations).",
        trained="SDE",
        deterministic=("ODE", "_ode"),
        prefix="loop-flow-target",
        overrides=TRAINING_PROMPTS,
    )


# the shipped recipe on prompts the base was not trained on: 13 of digits-paraphrased's 14 phrasings are
# new to digits-sd3 (trained on "a <colour> <digit>" only), so the base leaves headroom below 1
PARAPHRASED = [
    "loop.prompts=digits-paraphrased",
    "loop.eval_prompts=digits-paraphrased",
    "run.eval_every=0",
    "run.eval_size=0",
]
PARAPHRASED_EVAL = 700  # every digits-paraphrased prompt once (item i: prompt i, noise seeded by (EVAL_SEED, i))


def target_paraphrased(args) -> None:
    """The shipped recipe on 2 processes, trained on digits-paraphrased, next to the same recipe on the
    control's uniform reward, seeds 1..N; every final checkpoint judged by digits_alignment on one fixed
    set (all 700 prompts, one noise each, the same for every run, so the base is one number)."""
    runs_dir = Path(args.runs) / "target-paraphrased"
    runs_dir.mkdir(parents=True, exist_ok=True)
    results: dict[tuple, list] = {}
    for arm, extra in (("loop", []), ("control", [f"reward.name={CONTROL_REWARD}"])):
        prefix = f"target-{arm}"
        for seed, rows in harness.torchrun_target(
            TARGET_RECIPE, args.seeds, prefix, overrides=[*PARAPHRASED, *extra, *args.set], out=runs_dir
        ):
            ev = harness.evaluate_run(
                runs_dir / f"{prefix}-s{seed}",
                ["--num-samples", str(PARAPHRASED_EVAL), "--seed", str(EVAL_SEED)],
                "paraphrased",
                eval_overrides=["reward=digits_alignment"],
                reuse=True,
            )
            key = "reward/alignment" if arm == "control" else "reward/mean"
            res = {
                "seed": seed,
                "minutes": sum(r["perf/iteration_s"] for r in rows) / 60,
                "images": int(rows[-1]["progress/images"]),
                "rounds": len(rows),
                "base": ev["eval/base_reward"],
                "tuned": ev["eval/reward"],
                "base_ode": ev["eval/base_reward_ode"],
                "tuned_ode": ev["eval/reward_ode"],
                "curve": [(r["progress/images"], r[key]) for r in rows],
            }
            results.setdefault((arm, 1e-4), []).append(res)
            print(f"{prefix}-s{seed}: SDE {res['base']:.3f} -> {res['tuned']:.3f}, {res['minutes']:.1f} min")
    out = Path(args.out or RESULTS / "loop_flow_target_paraphrased.md")
    plot(results, {"loop": 1e-4, "control": 1e-4}, out.with_suffix(".png"))
    loop, control = results[("loop", 1e-4)], results[("control", 1e-4)]
    gain = [r["tuned"] - r["base"] for r in loop]
    noise = [r["tuned"] - r["base"] for r in control]
    paired = [a - b for a, b in zip(gain, noise)]
    lo_c, hi_c = stats.mean_interval(noise)
    difference = stats.paired(paired)
    loop_rounds = sorted({r["rounds"] for r in loop + control})
    loop_rounds = loop_rounds[0] if len(loop_rounds) == 1 else loop_rounds
    each = sum(g >= 0.15 and r["minutes"] <= 20 for g, r in zip(gain, loop))
    met = each == len(loop) and min(gain) > hi_c
    if stats.is_exploratory(len(loop)):  # fewer than 5 seeds: the numbers, no verdict word
        status = f"exploratory (n = {len(loop)}; a verdict needs {stats.MIN_SEEDS_FOR_VERDICT} seeds or more)"
    else:
        status = f"**{'met' if met else 'not met'}**"
    lines = [
        "# LOOP on digits-sd3, the shipped recipe on 2 CPU processes, on prompts the base was not trained on",
        "",
        f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
        f"`python benchmarks/loop_flow.py --target-paraphrased --seeds {args.seeds}"
        + "".join(f" --set {s}" for s in args.set)
        + "`.",
        "",
        "Why this table: on the 50 training prompts digits-sd3's base already scores 0.81-0.91 SDE alignment, so "
        "a gain of +0.15 is out of reach on most evaluation sets (loop_flow_target.md: every seed ends at "
        "0.98-1.00). Here the shipped recipe trains on `loop.prompts: digits-paraphrased` (700 prompts: 14 "
        "phrasings of the 50 (digit, colour) pairs, 13 of them new to the base; the recipe's own setting since "
        f"2026-12-06), {loop_rounds} rounds, with no in-run evaluation, "
        "under `torchrun --nproc_per_node 2`; the control is the same recipe on uniform random scores (no "
        "information about the image). Every final checkpoint is judged by `rlprox eval` with digits_alignment "
        f"on one fixed set: the {PARAPHRASED_EVAL} prompts once each, noise seeded by ({EVAL_SEED}, item); the "
        "base is the same number for every run. Minutes: summed iteration wall time (training only).",
        "",
        "| run | seed | images | minutes | SDE: base → tuned (Δ) | ODE: base → tuned (Δ) |",
        "|---|---|---|---|---|---|",
    ]
    for arm, runs in (("LOOP recipe", loop), ("control (uniform reward)", control)):
        for r in runs:
            lines.append(
                f"| {arm} | {r['seed']} | {r['images']:,} | {r['minutes']:.1f} | {r['base']:.3f} → {r['tuned']:.3f} "
                f"(**{r['tuned'] - r['base']:+.3f}**) | {r['base_ode']:.3f} → {r['tuned_ode']:.3f} "
                f"({r['tuned_ode'] - r['base_ode']:+.3f}) |"
            )
    lines += [
        "",
        f"- Δ SDE, recipe: {mean_sd(gain)}; control: {mean_sd(noise)} [{lo_c:+.3f}, {hi_c:+.3f}] (Student-t 95% "
        f"over seeds); recipe − control, same seed: {difference.format(3)}.",
        f"- Target (every seed ≥ +0.15 SDE within 20 minutes, each above the control's interval): "
        f"{status}: {each}/{len(loop)} seeds ≥ +0.15 within 20 minutes; lowest gain {min(gain):+.3f} vs the "
        f"control's upper bound {hi_c:+.3f}.",
        "",
        f"![training alignment vs images, mean over seeds]({out.with_suffix('.png').name})",
        "",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--speed", action="store_true", help="rlprox vs the naive loop, images/s")
    mode.add_argument("--target", action="store_true", help="the shipped digits-sd3 recipe on 2 processes")
    mode.add_argument(
        "--target-paraphrased",
        action="store_true",
        help="the shipped recipe on 2 processes on digits-paraphrased, with the uniform-reward control",
    )
    parser.add_argument("--rounds", type=int, default=6, help="--speed: timed rounds per block (after 1 warm-up)")
    parser.add_argument("--repeats", type=int, default=4, help="--speed: blocks of each loop (ABBA order)")
    parser.add_argument("--speed-out", default=str(RESULTS / "loop_flow_speed.md"))
    parser.add_argument("--arms", default=",".join(ARMS), help=f"science arms, of {', '.join(ARMS)}")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N (science and --target)")
    parser.add_argument("--lrs", default="3e-5,1e-4,3e-4", help="the lr grid every arm gets")
    parser.add_argument("--iterations", type=int, default=200, help="rounds per run (32 images each)")
    parser.add_argument("--eval-size", type=int, default=100, help="fixed evaluation items per run")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (one core each)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra recipe override for every science arm (--speed: for rlprox only; --target-paraphrased: "
        "for both runs)",
    )
    parser.add_argument(
        "--runs",
        default=str(Path(tempfile.gettempdir()) / "rlprox-loop-flow-runs"),
        help="run folders; a finished run with the same arguments is read back, not trained again",
    )
    parser.add_argument(
        "--out",
        default="",
        help="science table (default results/loop_flow.md; --target-paraphrased: "
        "results/loop_flow_target_paraphrased.md); the PNG goes beside it",
    )
    args = parser.parse_args()
    if args.speed:
        speed(args)
    elif args.target:
        target(args)
    elif args.target_paraphrased:
        target_paraphrased(args)
    else:
        science(args)


if __name__ == "__main__":
    main()
