"""digits-wan: a real diffusers ``WanPipeline``, tiny and trained from scratch, making 9-frame
32×32 clips of a coloured digit sliding in the direction the prompt names ("a red three moving left").

Components (stock diffusers / transformers classes, so a plain ``WanPipeline.from_pretrained(path)``
loads the result offline):

- ``tokenizer``: a word-level fast tokenizer over the digits words and the motion words;
- ``text_encoder``: a 1-layer ``UMT5EncoderModel`` (width 32), random and frozen: its sequences tell
  the prompts apart, the transformer learns to read them;
- ``vae``: an ``AutoencoderKLWan`` with two downsampling stages, both also temporal: 9 frames × 32 × 32
  -> 3 latent frames × 8 × 8 × 8 channels, ``scale_factor_spatial`` 4 and ``scale_factor_temporal`` 4
  (its real downsampling), trained first on the clips (MSE + 1e-6·KL); ``latents_mean`` / ``latents_std``
  are the training latents' per-channel statistics, as Wan's are;
- ``transformer``: a 2-layer ``WanTransformer3DModel`` (patch 1×2×2 on the latents: 48 tokens);
- ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` with shift 3 (Wan 2.1's flow shift at 480p).

Training is rectified flow (digits-sd3's objective, ``rlprox.zoo.sd3.rectified_flow_pair``): z_σ =
(1 − σ)·z₀ + σ·ε, v = ε − z₀, σ logit-normal, L = E‖v_θ(z_σ, 1000σ, c) − v‖², 10 % of prompts replaced by
"" for classifier-free guidance, EMA weights saved. Clips come from scikit-learn's digits
(``rlprox.zoo.data.load_motion_clips``: training base images, random colour, direction and offset).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from rlprox.zoo.data import CLIP_FRAMES, CLIP_SIZE, MOTION_WORDS
from rlprox.zoo.sd import PROMPT_WORDS, _one_cycle, ema_update
from rlprox.zoo.sd3 import build_t5_tokenizer, rectified_flow_pair

TEXT_WIDTH = 32
MAX_SEQUENCE_LENGTH = 226  # WanPipeline's default: the text length trained for
RECOMMENDED_GUIDANCE = 3.0
RECOMMENDED_STEPS = 20
CFG_DROPOUT = 0.1
VAE_BATCH = 16  # clips per VAE step: its convolutions over 9 × 32 × 32 frames dominate the build
SCHEDULER_KWARGS = dict(num_train_timesteps=1000, shift=3.0)
WORDS = (*PROMPT_WORDS, *MOTION_WORDS)


def text_encoder_config(tokenizer, width: int = TEXT_WIDTH):
    """A 1-layer, 2-head UMT5 encoder of ``width`` over ``tokenizer``'s vocabulary."""
    from transformers import UMT5Config

    return UMT5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=width // 2,
        d_ff=2 * width,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def build_components(
    seed: int = 0,
    z_dim: int = 8,
    vae_dim: int = 16,
    heads: int = 2,
    head_dim: int = 24,
    layers: int = 2,
) -> dict:
    """The untrained pipeline components, keyword arguments of ``WanPipeline`` (smaller sizes: the tests')."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer(WORDS)
    text_encoder = UMT5EncoderModel(text_encoder_config(tokenizer)).eval().requires_grad_(False)
    vae = AutoencoderKLWan(
        base_dim=vae_dim,
        z_dim=z_dim,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[True, True],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
        scale_factor_temporal=4,
        scale_factor_spatial=4,  # two downsampling stages
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=z_dim,
        out_channels=z_dim,
        text_dim=TEXT_WIDTH,
        freq_dim=32,
        ffn_dim=2 * heads * head_dim,
        num_layers=layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": vae,
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER_KWARGS),
    }


# ----------------------------------------------------------------------------- training
def _to_vae(clips: torch.Tensor) -> torch.Tensor:
    """Clips (N, T, 3, H, W) in [0, 1] -> the VAE's input (N, 3, T, H, W) in [-1, 1]."""
    return clips.permute(0, 2, 1, 3, 4) * 2 - 1


def train_vae(vae, steps: int, batch_size: int, gen, progress: bool, frames: int = CLIP_FRAMES):
    """MSE + 1e-6·KL on fresh training clips of ``frames`` frames: the first frame and two chunks of four, so the
    causal VAE learns its first-frame path and chunks that read a previous chunk's cache (a 5-frame clip, one
    chunk, leaves the third chunk of a 9-frame clip undertrained: it fades)."""
    from tqdm.auto import tqdm

    from rlprox.zoo.data import load_motion_clips

    opt, lr_schedule = _one_cycle(vae.parameters(), 2e-3, steps)
    vae.train()
    for step in tqdm(range(steps), desc="digits-wan vae", disable=not progress, leave=False):
        clips, _, _ = load_motion_clips("train", batch_size, seed=int(torch.randint(2**31, (1,), generator=gen)))
        x = _to_vae(clips[:, :frames])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_schedule.step()
    vae.eval()
    return loss.item()


@torch.no_grad()
def encode_clips(vae, clips: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The VAE's posterior means of clips (N, T, 3, H, W), (N, C, F', H', W'), unnormalised."""
    return torch.cat([vae.encode(_to_vae(chunk)).latent_dist.mean for chunk in clips.split(batch_size)])


@torch.no_grad()
def prompt_embeddings(pipe, prompts: list[str]) -> torch.Tensor:
    """UMT5's sequences (N, 226, D) of ``prompts``, as the pipeline computes them."""
    embeds, _ = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH, device="cpu"
    )
    return embeds


def train_transformer(transformer, latents, embeds, null, steps: int, batch_size: int, gen, progress: bool):
    """Rectified flow on the transformer (module docstring); returns the EMA copy and the mean loss of the
    last 10 % of steps. ``embeds`` (N, L, D) are each latent's prompt's, ``null`` (1, L, D) the empty prompt's."""
    from tqdm.auto import tqdm

    opt, lr_schedule = _one_cycle(transformer.parameters(), 1e-3, steps, pct_start=0.05)
    ema = copy.deepcopy(transformer).eval()
    params, ema_params = list(transformer.parameters()), list(ema.parameters())
    transformer.train()
    losses = []
    bar = tqdm(range(steps), desc="digits-wan transformer", disable=not progress, leave=False)
    for step in bar:
        idx = torch.randint(0, len(latents), (batch_size,), generator=gen)
        context = embeds[idx].clone()
        context[torch.rand(batch_size, generator=gen) < CFG_DROPOUT] = null
        noise = torch.randn(latents[idx].shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(batch_size, generator=gen))
        z_sigma, v_target = rectified_flow_pair(latents[idx], noise, sigma)
        v = transformer(
            hidden_states=z_sigma,
            timestep=sigma * SCHEDULER_KWARGS["num_train_timesteps"],
            encoder_hidden_states=context,
            return_dict=False,
        )[0]
        loss = F.mse_loss(v, v_target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_schedule.step()
        ema_update(ema_params, params, step)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    tail = losses[-max(1, steps // 10) :]
    return ema, sum(tail) / len(tail)


def train_wan_pipeline(
    vae_steps: int,
    transformer_steps: int,
    clips: int = 2000,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    **sizes,
):
    """Build and train the whole pipeline; returns an eval-mode ``WanPipeline`` and its training stats
    (the VAE's last loss, the held-out clips' reconstruction MSE, the transformer's final loss)."""
    from diffusers import WanPipeline

    from rlprox.zoo.data import load_motion_clips

    parts = build_components(seed, **sizes)
    gen = torch.Generator().manual_seed(seed)
    vae = parts["vae"]
    vae_loss = train_vae(vae, vae_steps, VAE_BATCH, gen, progress)
    train, prompts, _ = load_motion_clips("train", clips, seed=seed)
    raw = encode_clips(vae, train)  # (N, C, F', H', W')
    mean, std = raw.mean(dim=(0, 2, 3, 4)), raw.std(dim=(0, 2, 3, 4))
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    shape = (1, -1, 1, 1, 1)
    latents = (raw - mean.view(shape)) / std.view(shape)
    pipe = WanPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    unique = sorted(set(prompts))
    table = prompt_embeddings(pipe, [*unique, ""])
    embeds = table[torch.tensor([unique.index(p) for p in prompts])]
    transformer, flow_loss = train_transformer(
        parts["transformer"], latents, embeds, table[-1:], transformer_steps, batch_size, gen, progress
    )
    pipe.transformer = transformer
    held, _, _ = load_motion_clips("heldout", 64, seed=seed + 1)
    with torch.no_grad():
        recon = (vae.decode(encode_clips(vae, held)).sample.clamp(-1, 1) + 1) / 2
    recon_mse = F.mse_loss(recon.permute(0, 2, 1, 3, 4), held).item()
    return pipe, {"vae_loss_last": vae_loss, "vae_heldout_mse": recon_mse, "flow_loss_train_last": flow_loss}


@torch.no_grad()
def sample_clips(
    pipe,
    prompts: list[str],
    seed: int = 0,
    guidance_scale: float = RECOMMENDED_GUIDANCE,
    num_inference_steps: int = RECOMMENDED_STEPS,
) -> torch.Tensor:
    """Clips (len(prompts), 9, 3, 32, 32) in [0, 1] from the pipeline's own call; deterministic for a seed."""

    return pipe(
        prompts,
        num_frames=CLIP_FRAMES,
        height=CLIP_SIZE,
        width=CLIP_SIZE,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).frames.float()


def grid_prompts() -> list[str]:
    """Eight prompts, two per direction, digits and colours in turn: the sample grid's rows."""
    from rlprox.zoo.data import COLOUR_NAMES, DIRECTION_NAMES, motion_prompt_for

    return [motion_prompt_for(d, d % len(COLOUR_NAMES), d % len(DIRECTION_NAMES)) for d in range(8)]
