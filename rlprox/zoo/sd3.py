"""digits-sd3: a real diffusers ``StableDiffusion3Pipeline``, tiny and trained from scratch.

Components (stock diffusers / transformers classes, so a plain
``StableDiffusion3Pipeline.from_pretrained(path)`` loads the result offline):

- ``tokenizer`` / ``tokenizer_2``: digits-sd's hand-built CLIP BPE tokenizer, twice;
- ``text_encoder`` / ``text_encoder_2``: two 2-layer ``CLIPTextModelWithProjection`` (width 64),
  trained jointly with the transformer;
- ``tokenizer_3`` / ``text_encoder_3``: a word-level tokenizer (``tokenizers`` library) and a
  1-layer ``T5EncoderModel`` whose final RMSNorm gain is zero, so its embeddings are exactly the
  zeros the pipeline feeds when T5 is dropped (``text_encoder_3=None``). SD3 is trained with T5
  dropout for this mode; here T5 is always off and is shipped so that the stock loader works;
- ``vae``: digits-sd's ``AutoencoderKL`` (16×16×3 -> 8×8×4) with its init and ``train_vae``, so the
  same VAE as digits-sd of the seed; SD3 latents are z = (μ − shift_factor)·scaling_factor;
- ``transformer``: an ``SD3Transformer2DModel`` (MM-DiT, patch 1 on the 8×8 latents: 64 image tokens);
- ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` (shift 1).

Training is rectified-flow matching (Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis"; logit-normal σ from their §3.1): with z₀ a latent, ε ~ N(0, I) and
σ = sigmoid(n), n ~ N(0, 1),

    z_σ = (1 − σ)·z₀ + σ·ε,     v = dz_σ/dσ = ε − z₀,     L = E‖v_θ(z_σ, 1000σ, c) − v‖²,

with 10 % of prompts replaced by "" for classifier-free guidance; EMA weights are saved. The
pipeline's Euler step z_σ' = z_σ + (σ' − σ)·v_θ integrates this ODE from σ = 1 to 0.

The pipeline appends ``max_sequence_length`` (default 256) T5 tokens to the 8 CLIP tokens, all
zero. A token's path through an MM-DiT block depends only on itself and the attention inputs (no
position embedding on the context stream), so those tokens stay identical in every block, and
attention over n identical keys equals attention over one with log n added to its logit. Training
therefore carries one zero token with that bias (:class:`RepeatedTokenAttnProcessor`), 9 context
tokens instead of 264, for n drawn log-uniformly in [1, 256]: the plain call (n = 256) and short
``max_sequence_length`` calls are both in the training distribution.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from rlprox.zoo.data import DigitsData
from rlprox.zoo.sd import (
    MAX_PROMPT_TOKENS,
    PROMPT_WORDS,
    _one_cycle,
    build_tokenizer,
    clip_text_config,
    ema_step,
    load_sd_pipeline,
    train_vae,
)
from rlprox.zoo.sd import build_components as sd_components

CLIP_WIDTH = 64
JOINT_WIDTH = 2 * CLIP_WIDTH  # the two CLIP sequences side by side; T5's width, so the pipeline pads nothing
T5_MAX_TOKENS = 256  # the pipeline's default max_sequence_length: the most T5 tokens trained for
RECOMMENDED_GUIDANCE = 1.5
RECOMMENDED_STEPS = 20
CFG_DROPOUT = 0.1
SCHEDULER_KWARGS = dict(num_train_timesteps=1000, shift=1.0)
T5_SPECIAL = ("<pad>", "</s>", "<unk>")  # T5's ids 0, 1, 2


# ----------------------------------------------------------------------------- components
def build_t5_tokenizer(words: tuple[str, ...] = PROMPT_WORDS):
    """A word-level fast tokenizer: ``words`` (the prompt words), lower-cased, then ``</s>`` (T5's layout)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*T5_SPECIAL, *words))}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    eos = vocab["</s>"]
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _clip_encoder(tokenizer):
    from transformers import CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(clip_text_config(tokenizer, CLIP_WIDTH))


def t5_text_config(tokenizer, width: int = JOINT_WIDTH):
    """A 1-layer, 2-head T5 encoder of ``width`` over ``build_t5_tokenizer``'s vocabulary
    (digits-sd3's, the FLUX tests' tiny one)."""
    from transformers import T5Config

    return T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=width // 4,
        d_ff=width,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="relu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def _zero_t5_encoder(tokenizer):
    from transformers import T5EncoderModel

    t5 = T5EncoderModel(t5_text_config(tokenizer))
    with torch.no_grad():
        t5.encoder.final_layer_norm.weight.zero_()  # every output exactly 0: SD3 with T5 dropped
    return t5.eval().requires_grad_(False)


def build_components(seed: int = 0) -> dict:
    """The untrained pipeline components, keyword arguments of ``StableDiffusion3Pipeline``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    tokenizer, tokenizer_3 = build_tokenizer(), build_t5_tokenizer()
    # digits-sd's VAE as initialised for this seed: train_vae then gives digits-sd's VAE exactly (the recipe is
    # sensitive to its init: another seed-0 init of the same architecture reconstructed ≈7× worse)
    vae = sd_components(tokenizer, seed=seed)["vae"]
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=JOINT_WIDTH,
        caption_projection_dim=64,  # = heads × head dim: the context stream's width
        pooled_projection_dim=2 * CLIP_WIDTH,
        pos_embed_max_size=8,
    )
    return {
        "tokenizer": tokenizer,
        "tokenizer_2": copy.deepcopy(tokenizer),
        "tokenizer_3": tokenizer_3,
        "text_encoder": _clip_encoder(tokenizer),
        "text_encoder_2": _clip_encoder(tokenizer),
        "text_encoder_3": _zero_t5_encoder(tokenizer_3),
        "vae": vae,
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER_KWARGS),
    }


# ----------------------------------------------------------------------------- conditioning
def clip_conditioning(text_encoders, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP ids (B, L) -> context (B, L, 2·64) and pooled (B, 2·64), as the pipeline's ``encode_prompt``
    builds them: each encoder's penultimate hidden states side by side, projected pooled outputs concatenated."""
    outs = [encoder(ids, output_hidden_states=True) for encoder in text_encoders]
    context = torch.cat([out.hidden_states[-2] for out in outs], dim=-1)
    pooled = torch.cat([out.text_embeds for out in outs], dim=-1)
    return context, pooled


class RepeatedTokenAttnProcessor:
    """MM-DiT joint attention in which the last context token stands for ``exp(log_count)`` copies of itself.

    Softmax attention over keys where key j occurs n_j times: softmax_j(q·k_j/√d + log n_j)·V. Same
    projections, norms and output layers as the stock joint processor, so trained weights behave the same
    under it when the copies are really there. ``log_count`` is (B,) or a scalar, set before each call.
    """

    def __init__(self, log_count: torch.Tensor | float = 0.0):
        self.log_count = log_count

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        batch, n_image = hidden_states.shape[:2]

        def split_heads(x):  # (B, N, H·d) -> (B, H, N, d)
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        def normed(norm, x):
            return x if norm is None else norm(x)

        q = normed(attn.norm_q, split_heads(attn.to_q(hidden_states)))
        k = normed(attn.norm_k, split_heads(attn.to_k(hidden_states)))
        v = split_heads(attn.to_v(hidden_states))
        cq = normed(attn.norm_added_q, split_heads(attn.add_q_proj(encoder_hidden_states)))
        ck = normed(attn.norm_added_k, split_heads(attn.add_k_proj(encoder_hidden_states)))
        cv = split_heads(attn.add_v_proj(encoder_hidden_states))
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)  # (B, H, N_img + N_ctx, d)
        bias = torch.zeros(batch, 1, 1, k.shape[2], dtype=q.dtype, device=q.device)
        bias[:, 0, 0, -1] = torch.as_tensor(self.log_count, dtype=q.dtype, device=q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * q.shape[-1])
        image, context = out[:, :n_image], out[:, n_image:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](image)), context


@contextmanager
def repeated_last_token(transformer, log_count):
    """Run ``transformer`` with :class:`RepeatedTokenAttnProcessor`; the stock processors come back after."""
    stock = transformer.attn_processors
    transformer.set_attn_processor(RepeatedTokenAttnProcessor(log_count))
    try:
        yield
    finally:
        transformer.set_attn_processor(stock)


def velocity(transformer, z_sigma, sigma, context, pooled, log_t5_tokens) -> torch.Tensor:
    """v_θ(z_σ, 1000σ, c) with the pipeline's T5 tokens (all zero) folded into one token (module docstring)."""
    null = context.new_zeros(context.shape[0], 1, JOINT_WIDTH)
    with repeated_last_token(transformer, log_t5_tokens):
        return transformer(
            z_sigma,
            encoder_hidden_states=torch.cat([context, null], dim=1),
            pooled_projections=pooled,
            timestep=sigma * SCHEDULER_KWARGS["num_train_timesteps"],
        ).sample


# ----------------------------------------------------------------------------- objective
def rectified_flow_pair(z0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor):
    """z_σ = (1 − σ)·z₀ + σ·ε and the velocity target v = ε − z₀; σ is (B,), broadcast over the rest."""
    s = sigma.view(-1, *([1] * (z0.dim() - 1)))
    return (1 - s) * z0 + s * noise, noise - z0


def rectified_flow_loss(v_pred: torch.Tensor, v_target: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """E‖v_θ − v‖² (mean over every element), with ``loss/flow``."""
    loss = F.mse_loss(v_pred, v_target)
    return loss, {"loss/flow": loss.item()}


def sample_sigma_and_t5_tokens(batch_size: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """σ = sigmoid(n), n ~ N(0, 1) (logit-normal), and log n_T5 ~ U(0, log 256), both (B,)."""
    sigma = torch.sigmoid(torch.randn(batch_size, generator=gen))
    log_t5 = torch.rand(batch_size, generator=gen) * math.log(T5_MAX_TOKENS)
    return sigma, log_t5


# ----------------------------------------------------------------------------- training
def _clip_ids(tokenizer, prompts) -> torch.Tensor:
    return tokenizer(
        list(prompts), padding="max_length", max_length=MAX_PROMPT_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids


def train_transformer(
    transformer,
    text_encoders,
    tokenizer,
    latents: torch.Tensor,
    prompts,
    steps: int,
    batch_size: int,
    gen,
    progress: bool,
    cfg_dropout: float = CFG_DROPOUT,
):
    """Rectified flow on the transformer and both CLIP encoders jointly; returns the EMA copies and the
    mean training loss of the last 10 % of steps."""
    from tqdm.auto import tqdm

    ids_all, ids_empty = _clip_ids(tokenizer, prompts), _clip_ids(tokenizer, [""])
    models = [transformer, *text_encoders]
    params = [p for m in models for p in m.parameters()]
    opt, lr_schedule = _one_cycle(params, 1e-3, steps, pct_start=0.05)
    ema_models = [copy.deepcopy(m).eval() for m in models]
    ema_params = [p for m in ema_models for p in m.parameters()]
    for m in models:
        m.train()
    losses = []
    bar = tqdm(range(steps), desc="digits-sd3 transformer", disable=not progress, leave=False)
    for step in bar:
        idx = torch.randint(0, len(latents), (batch_size,), generator=gen)
        ids = ids_all[idx].clone()
        ids[torch.rand(batch_size, generator=gen) < cfg_dropout] = ids_empty
        noise = torch.randn(latents[idx].shape, generator=gen)
        sigma, log_t5 = sample_sigma_and_t5_tokens(batch_size, gen)
        z_sigma, v_target = rectified_flow_pair(latents[idx], noise, sigma)
        context, pooled = clip_conditioning(text_encoders, ids)
        loss, stats = rectified_flow_loss(velocity(transformer, z_sigma, sigma, context, pooled, log_t5), v_target)
        ema_step(loss, opt, lr_schedule, params, ema_params, step, bar)
        losses.append(stats["loss/flow"])
    tail = losses[-max(1, steps // 10) :]
    return ema_models[0], ema_models[1:], sum(tail) / len(tail)


def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, 16, 16) in [0, 1] -> SD3 latents (μ − shift_factor)·scaling_factor, (N, 4, 8, 8)."""
    with torch.no_grad():
        mean = torch.cat([vae.encode(x * 2 - 1).latent_dist.mean for x in images.split(512)])
    return (mean - vae.config.shift_factor) * vae.config.scaling_factor


def train_sd3_pipeline(
    train: DigitsData,
    vae_steps: int,
    transformer_steps: int,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
):
    """Build and train the whole pipeline; returns an eval-mode ``StableDiffusion3Pipeline`` and the
    final training loss (the mean over the last 10 % of steps)."""
    from diffusers import StableDiffusion3Pipeline

    parts = build_components(seed)
    gen = torch.Generator().manual_seed(seed)
    vae = parts["vae"]
    scaled = train_vae(vae, train, vae_steps, batch_size, gen, progress, desc="digits-sd3 vae")  # μ·scale
    vae.register_to_config(shift_factor=float(scaled.mean() / vae.config.scaling_factor))
    transformer, text_encoders, train_loss = train_transformer(
        parts["transformer"],
        [parts["text_encoder"], parts["text_encoder_2"]],
        parts["tokenizer"],
        encode_latents(vae, train.images),
        train.prompts,
        transformer_steps,
        batch_size,
        gen,
        progress,
    )
    parts.update(transformer=transformer, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1])
    pipe = StableDiffusion3Pipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe, train_loss


@torch.no_grad()
def heldout_flow_loss(pipe, data: DigitsData, seed: int = 0, batch_size: int = 512) -> float:
    """The training objective on ``data`` (no prompt dropout, n_T5 = 256), fixed noise for a seed."""
    gen = torch.Generator().manual_seed(seed)
    latents = encode_latents(pipe.vae, data.images)
    ids = _clip_ids(pipe.tokenizer, data.prompts)
    total = 0.0
    for start in range(0, len(latents), batch_size):
        z0 = latents[start : start + batch_size]
        noise = torch.randn(z0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(len(z0), generator=gen))
        z_sigma, v_target = rectified_flow_pair(z0, noise, sigma)
        context, pooled = clip_conditioning([pipe.text_encoder, pipe.text_encoder_2], ids[start : start + len(z0)])
        v_pred = velocity(pipe.transformer, z_sigma, sigma, context, pooled, math.log(T5_MAX_TOKENS))
        total += F.mse_loss(v_pred, v_target, reduction="sum").item()
    return total / latents.numel()


def load_sd3_pipeline(path: str | Path):
    """``StableDiffusion3Pipeline.from_pretrained`` on a local path, progress bars off."""
    from diffusers import StableDiffusion3Pipeline

    return load_sd_pipeline(path, pipeline_class=StableDiffusion3Pipeline)
