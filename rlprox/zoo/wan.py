"""digits-wan: a real diffusers ``WanPipeline``, tiny and trained from scratch, making 9-frame
32×32 clips of a coloured digit sliding in the direction the prompt names ("a red three moving left").

Components (stock diffusers / transformers classes, so a plain ``WanPipeline.from_pretrained(path)``
loads the result offline):

- ``tokenizer``: a word-level fast tokenizer over the digits words and the motion words;
- ``text_encoder``: a 1-layer ``UMT5EncoderModel`` (width 32), trained jointly with the transformer;
- ``vae``: an ``AutoencoderKLWan`` (width 8) with two downsampling stages, both also temporal: 9 frames ×
  32 × 32 -> 3 latent frames × 8 × 8 × 16 channels, ``scale_factor_spatial`` 4 and ``scale_factor_temporal``
  4 (its real downsampling), trained first on 16 × 16 crops of the clips (MSE + 1e-6·KL);
  ``latents_mean`` / ``latents_std`` are the training latents' per-channel statistics, as Wan's are;
- ``transformer``: a 2-layer ``WanTransformer3DModel`` (2 heads of 32; patch 1×2×2 on the latents: 48 tokens);
- ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` with shift 3 (Wan 2.1's flow shift at 480p).

Training is rectified flow (digits-sd3's objective, ``rlprox.zoo.sd3.rectified_flow_pair``): z_σ =
(1 − σ)·z₀ + σ·ε, v = ε − z₀, σ logit-normal, L = E‖v_θ(z_σ, 1000σ, c) − v‖², 10 % of prompts replaced by
"" for classifier-free guidance, EMA weights saved. Clips come from scikit-learn's digits
(``rlprox.zoo.data.load_motion_clips``: training base images, random colour, direction and offset). The
text is the pipeline's UMT5 sequence cut to a length drawn log-uniformly in [16, 226] per step
(``train_transformer``): the plain call's 226 tokens are in the training distribution.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from rlprox.zoo.data import CLIP_FRAMES, CLIP_SIZE, MOTION_WORDS
from rlprox.zoo.sd import PROMPT_WORDS, _one_cycle, ema_step, vae_step
from rlprox.zoo.sd3 import build_t5_tokenizer, rectified_flow_pair

TEXT_WIDTH = 32
MAX_SEQUENCE_LENGTH = 226  # WanPipeline's default: the text length trained for
RECOMMENDED_GUIDANCE = 3.0
RECOMMENDED_STEPS = 20
CFG_DROPOUT = 0.1
MIN_TEXT_TOKENS = 16  # the shortest text length trained (the prompts have at most 8 tokens)
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
    z_dim: int = 16,
    vae_dim: int = 8,
    heads: int = 2,
    head_dim: int = 32,
    layers: int = 2,
) -> dict:
    """The untrained pipeline components, keyword arguments of ``WanPipeline`` (smaller sizes: the tests')."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    torch.manual_seed(seed)
    tokenizer = build_t5_tokenizer(WORDS)
    text_encoder = UMT5EncoderModel(text_encoder_config(tokenizer)).eval()
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


def train_vae(vae, steps: int, batch_size: int, gen, progress: bool, frames: int = CLIP_FRAMES, crop: int = 16):
    """MSE + 1e-6·KL on fresh training clips of ``frames`` frames (the first frame and two chunks of four, so the
    causal VAE learns its first-frame path and chunks that read the previous chunk's cache), cropped to
    ``crop`` × ``crop`` pixels at a random place per step: the VAE is convolutional (its one attention is
    over a frame's positions, any size), and a quarter of the pixels is a quarter of the cost."""
    from tqdm.auto import tqdm

    from rlprox.zoo.data import load_motion_clips

    opt, lr_schedule = _one_cycle(vae.parameters(), 2e-3, steps)
    vae.train()
    for step in tqdm(range(steps), desc="digits-wan vae", disable=not progress, leave=False):
        clips, _, _ = load_motion_clips("train", batch_size, seed=int(torch.randint(2**31, (1,), generator=gen)))
        y0, x0 = torch.randint(0, CLIP_SIZE - crop + 1, (2,), generator=gen).tolist()
        loss = vae_step(vae, _to_vae(clips[:, :frames, :, y0 : y0 + crop, x0 : x0 + crop]), gen, opt, lr_schedule)
    vae.eval()
    return loss.item()


@torch.no_grad()
def encode_clips(vae, clips: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The VAE's posterior means of clips (N, T, 3, H, W), (N, C, F', H', W'), unnormalised."""
    return torch.cat([vae.encode(_to_vae(chunk)).latent_dist.mean for chunk in clips.split(batch_size)])


def text_ids(tokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) (N, 226) of ``prompts``, tokenized as the pipeline's ``encode_prompt`` does."""
    out = tokenizer(
        prompts,
        padding="max_length",
        max_length=MAX_SEQUENCE_LENGTH,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return out.input_ids, out.attention_mask


def text_states(text_encoder, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """UMT5's sequence (B, L, D) for ids (B, L): its states over the prompt's tokens, zeros past them, as the
    pipeline's ``encode_prompt`` gives them for ``max_sequence_length`` L."""
    states = text_encoder(ids, mask).last_hidden_state
    return states * mask[..., None].to(states.dtype)


def train_transformer(transformer, text_encoder, latents, ids, mask, steps: int, batch_size: int, gen, progress: bool):
    """Rectified flow on the transformer and the UMT5 encoder jointly (module docstring); returns their EMA
    copies and the mean loss of the last 10 % of steps. ``ids``, ``mask`` (N + 1, 226): each latent's prompt's
    tokens, then the empty prompt's (classifier-free guidance's null)."""
    from tqdm.auto import tqdm

    models = [transformer, text_encoder]
    params = [p for m in models for p in m.parameters()]
    opt, lr_schedule = _one_cycle(params, 2e-3, steps, pct_start=0.05)
    ema_models = [copy.deepcopy(m).eval() for m in models]
    ema_params = [p for m in ema_models for p in m.parameters()]
    for m in models:
        m.requires_grad_(True).train()
    losses = []
    bar = tqdm(range(steps), desc="digits-wan transformer", disable=not progress, leave=False)
    for step in bar:
        idx = torch.randint(0, len(latents), (batch_size,), generator=gen)
        # a text length log-uniform in [MIN_TEXT_TOKENS, 226]: the pipeline's sequence of L tokens is the first L
        # of its 226 (zero past the prompt), so short ones teach the cross-attention to find the prompt's few
        # tokens and long ones keep the plain call (226) in the training distribution
        length = int(
            math.exp(torch.empty(1).uniform_(math.log(MIN_TEXT_TOKENS), math.log(ids.shape[1]), generator=gen))
        )
        rows = torch.where(torch.rand(batch_size, generator=gen) < CFG_DROPOUT, len(ids) - 1, idx)
        context = text_states(text_encoder, ids[rows, :length], mask[rows, :length])
        noise = torch.randn(latents[idx].shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(batch_size, generator=gen))
        z_sigma, v_target = rectified_flow_pair(latents[idx], noise, sigma)
        v = transformer(
            hidden_states=z_sigma,
            timestep=sigma * SCHEDULER_KWARGS["num_train_timesteps"],
            encoder_hidden_states=context,
            return_dict=False,
        )[0]
        losses.append(ema_step(F.mse_loss(v, v_target), opt, lr_schedule, params, ema_params, step, bar))
    tail = losses[-max(1, steps // 10) :]
    return ema_models[0], ema_models[1].requires_grad_(False), sum(tail) / len(tail)


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
    ids, mask = text_ids(parts["tokenizer"], [*prompts, ""])
    transformer, text_encoder, flow_loss = train_transformer(
        parts["transformer"], parts["text_encoder"], latents, ids, mask, transformer_steps, batch_size, gen, progress
    )
    parts.update(transformer=transformer, text_encoder=text_encoder)
    pipe = WanPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
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
