"""digits-sd: a real diffusers ``StableDiffusionPipeline``, tiny and trained from scratch.

Components (all stock diffusers / transformers classes, so ``StableDiffusionPipeline.
from_pretrained(path)`` loads the result in a fresh process with no network):

- ``CLIPTokenizer`` over a hand-built BPE vocabulary of the prompt words;
- a 2-layer ``CLIPTextModel`` (width 64), trained jointly with the UNet;
- an ``AutoencoderKL`` 16×16×3 -> 8×8×4 latents, trained first (MSE + 1e-6·KL);
- an ``UNet2DConditionModel`` (32/64 channels, cross-attention only at 4×4);
- a ``DDIMScheduler`` (scaled-linear betas, ε prediction).

The UNet objective is the usual ε-MSE  E‖ε − ε_θ(√ᾱ_t z₀ + √(1−ᾱ_t) ε, t, c)‖², with
10 % of prompts replaced by "" so classifier-free guidance works at sampling time.
EMA weights are the ones saved.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

import rlprox.quiet  # noqa: F401  (two library notices dropped)
from rlprox.zoo.data import COLOUR_NAMES, DIGIT_WORDS, DigitsData

PROMPT_WORDS: tuple[str, ...] = (
    "a",
    "an",
    "the",
    "digit",
    "number",
    "of",
    "in",
    "on",
    *COLOUR_NAMES,
    *DIGIT_WORDS,
)
MAX_PROMPT_TOKENS = 8  # <sot> + up to 6 words + <eot>
RECOMMENDED_GUIDANCE = 2.0
RECOMMENDED_STEPS = 20

SCHEDULER_KWARGS = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


# ----------------------------------------------------------------------------- tokenizer
def _bpe(word: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """Greedy BPE as CLIP applies it: repeatedly merge the lowest-ranked adjacent pair."""
    while len(word) > 1:
        pairs = [(ranks.get((a, b), None), i) for i, (a, b) in enumerate(zip(word, word[1:]))]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            break
        rank = min(r for r, _ in pairs)
        merged, i = [], 0
        while i < len(word):
            if i < len(word) - 1 and ranks.get((word[i], word[i + 1])) == rank:
                merged.append(word[i] + word[i + 1])
                i += 2
            else:
                merged.append(word[i])
                i += 1
        word = tuple(merged)
    return word


def build_vocab(words=PROMPT_WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style (vocab, merges) pair in which every word in ``words`` is one token.

    Merges are appended per word until greedy BPE resolves it to a single token.
    Appending can never change an earlier word: that word already stopped at one token,
    and new merges rank after every merge it used.
    """
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab_list = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    ranks: dict[tuple[str, str], int] = {}
    merges: list[str] = []
    for w in words:
        symbols = tuple(w[:-1]) + (w[-1] + "</w>",)
        while len(tokens := _bpe(symbols, ranks)) > 1:
            a, b = tokens[0], tokens[1]
            ranks[(a, b)] = len(merges)
            merges.append(f"{a} {b}")
            if a + b not in vocab_list:
                vocab_list.append(a + b)
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def build_tokenizer():
    from transformers import CLIPTokenizer

    vocab, merges = build_vocab()
    return CLIPTokenizer(
        vocab=vocab,
        merges=[tuple(m.split(" ")) for m in merges],
        model_max_length=MAX_PROMPT_TOKENS,
        pad_token="<|endoftext|>",
    )


# ----------------------------------------------------------------------------- components
def clip_text_config(tokenizer, width: int):
    """A 2-layer, 2-head CLIP text encoder of ``width`` over the hand-built tokenizer's vocabulary
    (the digits world's text encoders: digits-sd's, digits-sd3's two, the tests' tiny ones)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_PROMPT_TOKENS,
        projection_dim=width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_components(tokenizer, seed: int = 0) -> dict:
    """Untrained text encoder, VAE, UNet and the DDIM scheduler (configs from the notes)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    text_config = clip_text_config(tokenizer, 64)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=16,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        mid_block_add_attention=False,
    )
    # attention_head_dim is the number of heads in diffusers: 2 keeps heads 16/32-d.
    # Cross-attention only at the 4×4 level keeps a step ≈0.34 s at batch 128 on 1 thread.
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=2,
        norm_num_groups=16,
    )
    return {
        "text_encoder": CLIPTextModel(text_config),
        "vae": vae,
        "unet": unet,
        "scheduler": DDIMScheduler(**SCHEDULER_KWARGS),
    }


def _one_cycle(params, lr: float, steps: int, pct_start: float = 0.3):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=pct_start)
    return opt, sched


@torch.no_grad()
def ema_update(ema_params, params, step: int, max_decay: float = 0.999) -> None:
    """EMA with warm-up: decay = min(max_decay, (1 + step) / (10 + step)), ema ← ema + (1 − decay)(θ − ema)."""
    decay = min(max_decay, (1 + step) / (10 + step))
    for pe, p in zip(ema_params, params):
        pe.lerp_(p, 1 - decay)


def ema_step(loss: torch.Tensor, opt, schedule, params, ema_params, step: int, bar) -> float:
    """One step of a zoo denoiser's training: backward, grad-norm clip 1, AdamW step, lr schedule, the EMA
    update and the progress bar's loss; returns the loss."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    schedule.step()
    ema_update(ema_params, params, step)
    value = loss.item()
    bar.set_postfix(loss=f"{value:.3f}", refresh=False)
    return value


def vae_step(vae, x: torch.Tensor, gen, opt, schedule) -> torch.Tensor:
    """One step of a zoo VAE's training on ``x`` in [−1, 1]: reconstruction MSE + 1e-6·KL of a posterior sample."""
    posterior = vae.encode(x).latent_dist
    recon = vae.decode(posterior.sample(generator=gen)).sample
    loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    schedule.step()
    return loss


def train_vae(vae, train: DigitsData, steps: int, batch_size: int, gen, progress: bool, desc: str = "digits-sd vae"):
    """AutoencoderKL on MSE + 1e-6·KL; then scaling_factor = 1/std(train latents)."""
    from tqdm.auto import tqdm

    opt, sched = _one_cycle(vae.parameters(), 2e-3, steps)
    vae.train()
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        idx = torch.randint(0, len(train), (batch_size,), generator=gen)
        vae_step(vae, train.images[idx] * 2 - 1, gen, opt, sched)  # diffusers VAEs work in [-1, 1]
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(x * 2 - 1).latent_dist.mean for x in train.images.split(512)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return latents * vae.config.scaling_factor  # (N, 4, 8, 8) scaled latents


def train_unet(
    unet,
    text_encoder,
    tokenizer,
    latents,
    prompts,
    steps,
    batch_size,
    gen,
    progress,
    cfg_dropout: float = 0.1,
):
    """ε-MSE on the UNet and text encoder jointly; returns the EMA copies."""
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_KWARGS.items() if k not in ("set_alpha_to_one",)})
    ids_all = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=MAX_PROMPT_TOKENS,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    ids_empty = tokenizer([""], padding="max_length", max_length=MAX_PROMPT_TOKENS, return_tensors="pt").input_ids
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt, sched = _one_cycle(params, 1e-3, steps, pct_start=0.05)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    unet.train()
    text_encoder.train()
    bar = tqdm(range(steps), desc="digits-sd unet", disable=not progress, leave=False)
    for step in bar:
        idx = torch.randint(0, len(latents), (batch_size,), generator=gen)
        z0 = latents[idx]
        ids = ids_all[idx].clone()
        drop = torch.rand(batch_size, generator=gen) < cfg_dropout
        ids[drop] = ids_empty
        noise = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=gen)
        zt = noise_sched.add_noise(z0, noise, t)
        cond = text_encoder(ids)[0]
        ema_step(
            F.mse_loss(unet(zt, t, encoder_hidden_states=cond).sample, noise),
            opt,
            sched,
            params,
            ema_params,
            step,
            bar,
        )
    return ema_unet, ema_text


def train_sd_pipeline(
    train: DigitsData,
    vae_steps: int,
    unet_steps: int,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
):
    """Build and train the whole pipeline; returns an eval-mode ``StableDiffusionPipeline``."""
    from diffusers import StableDiffusionPipeline

    tokenizer = build_tokenizer()
    parts = build_components(tokenizer, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    latents = train_vae(parts["vae"], train, vae_steps, batch_size, gen, progress)
    unet, text_encoder = train_unet(
        parts["unet"],
        parts["text_encoder"],
        tokenizer,
        latents,
        train.prompts,
        unet_steps,
        batch_size,
        gen,
        progress,
    )
    pipe = StableDiffusionPipeline(
        vae=parts["vae"],
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=parts["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_sd(
    pipe,
    prompts: list[str],
    seed: int = 0,
    guidance_scale: float = RECOMMENDED_GUIDANCE,
    num_inference_steps: int = RECOMMENDED_STEPS,
    batch_size: int = 250,
    **pipe_kwargs,
) -> torch.Tensor:
    """Images (len(prompts), 3, 16, 16) in [0,1]; deterministic for a seed. ``pipe_kwargs`` go to the
    pipeline's call (e.g. ``max_sequence_length`` of an SD3 pipeline)."""
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        images = pipe(
            chunk,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=gen,
            output_type="pt",
            **pipe_kwargs,
        ).images
        out.append(images.float().clamp(0, 1))
    return torch.cat(out)


@torch.no_grad()
def vae_reconstruction_mse(pipe, data: DigitsData) -> float:
    """MSE in [0,1] pixel space of decode(mean latent) on ``data``."""
    errs = []
    for x in data.images.split(512):
        z = pipe.vae.encode(x * 2 - 1).latent_dist.mean
        recon = (pipe.vae.decode(z).sample + 1) / 2
        errs.append(((recon.clamp(0, 1) - x) ** 2).mean(dim=(1, 2, 3)))
    return torch.cat(errs).mean().item()


def load_sd_pipeline(path: str | Path, pipeline_class=None):
    """``pipeline_class.from_pretrained`` (default ``StableDiffusionPipeline``) on a local path, progress bars off."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()  # loading bars would drown a run's one-line errors
    transformers.utils.logging.disable_progress_bar()
    pipe = (pipeline_class or diffusers.StableDiffusionPipeline).from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe
