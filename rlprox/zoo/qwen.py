"""digits-qwen: a real diffusers ``QwenImagePipeline``, tiny and trained from scratch.

Components (stock diffusers / transformers classes, so a plain ``QwenImagePipeline.from_pretrained(path)``
loads the result offline):

- ``tokenizer``: a byte-level BPE (``tokenizers``), trained here on the pipeline's prompt template and
  the digits words until every word is one token, so that the template's prefix is exactly
  ``prompt_template_encode_start_idx`` (34) tokens, as with Qwen's own tokenizer: the pipeline drops that
  many tokens from the front of every encoded prompt, and a tokenizer that splits the prefix into fewer
  tokens would have it drop the prompt's first words (``check_template_prefix``);
- ``text_encoder``: a 2-layer ``Qwen2_5_VLForConditionalGeneration`` (width 64, a 1-block vision tower
  that the text-to-image pipeline never runs), random and frozen: its last hidden states of the
  template-wrapped prompt are the conditioning, as in Qwen-Image;
- ``vae``: an ``AutoencoderKLQwenImage`` (Wan's causal video VAE; one spatial downsampling, 16×16×3 ->
  8×8×4 on one frame), trained on the digits; its ``latents_mean`` / ``latents_std`` are the training
  latents' per-channel moments, so the pipeline's normalised latents have unit scale;
- ``transformer``: a ``QwenImageTransformer2DModel`` (4 dual-stream blocks, 2 heads of 32) on the packed
  latents: 2×2 patches of the 8×8×4 latent, 16 tokens of 16 channels;
- ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` with Qwen-Image's dynamic exponential shift.

Training is rectified-flow matching (Esser et al. 2024, §3.1, logit-normal σ), as digits-sd3: with z₀ a
packed, normalised latent, ε ~ N(0, I) and σ = sigmoid(n), n ~ N(0, 1),

    z_σ = (1 − σ)·z₀ + σ·ε,     v = ε − z₀,     L = E‖v_θ(z_σ, σ, c) − v‖²,

with 10 % of prompts replaced by "" or " " (the adapter's default negative prompt) for true
classifier-free guidance; EMA weights are saved. The text encoder being frozen, each distinct prompt's
conditioning is computed once, by the pipeline's own ``encode_prompt``.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from rlprox.zoo.data import DigitsData
from rlprox.zoo.sd import PROMPT_WORDS, _one_cycle, ema_step, load_sd_pipeline, vae_step

TEXT_WIDTH = 64
LATENT_CHANNELS = 4
RECOMMENDED_GUIDANCE = 1.5
RECOMMENDED_STEPS = 20
CFG_DROPOUT = 0.1
NEGATIVE_PROMPTS = ("", " ")  # the CFG-dropout prompts: the empty prompt and the adapter's default negative
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # pad, turn start, turn end (Qwen's)
# Qwen-Image's scheduler: σ's shifted exponentially by μ, linear in the image's token count
SCHEDULER_KWARGS = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=8192,
    max_shift=0.9,
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    time_shift_type="exponential",
    use_dynamic_shifting=True,
)


# ----------------------------------------------------------------------------- tokenizer
def pipeline_template() -> tuple[str, int]:
    """QwenImagePipeline's prompt template and how many of its leading tokens the pipeline drops."""
    from diffusers import QwenImagePipeline

    holder = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    return holder.prompt_template_encode, holder.prompt_template_encode_start_idx


def build_tokenizer():
    """A byte-level BPE ``Qwen2Tokenizer`` trained on the template and the digits words: every template
    word and every prompt word (with and without its leading space) ends as one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    template, _ = pipeline_template()
    sentence = " ".join(PROMPT_WORDS)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,  # more than the merges the corpus has: training stops when every word is whole
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    backend.train_from_iterator([template.format(sentence), sentence, *PROMPT_WORDS], trainer)
    tokenizer = Qwen2Tokenizer(tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    check_template_prefix(tokenizer)
    return tokenizer


def check_template_prefix(tokenizer) -> None:
    """ValueError unless the template's prefix (before the prompt) is exactly the number of tokens the
    pipeline drops."""
    template, drop = pipeline_template()
    count = len(tokenizer(template.split("{}")[0]).input_ids)
    if count != drop:
        raise ValueError(f"the template's prefix is {count} tokens, the pipeline drops {drop}")


# ----------------------------------------------------------------------------- components
def text_encoder_config(tokenizer, width: int = TEXT_WIDTH, heads: int = 2, kv_heads: int = 1, sections=None):
    """A 2-layer Qwen2.5-VL of ``width`` (``heads`` query heads, ``kv_heads`` key/value heads) over
    ``tokenizer``'s vocabulary, its vision tower one tiny block. ``sections``: M-RoPE's split of each head's
    rotary half into (time, row, column); unset: as even as it goes."""
    from transformers import Qwen2_5_VLConfig

    half = width // heads // 2
    sections = list(sections or [half - 2 * (half // 3), half // 3, half // 3])
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.pad_token_id)
    ids["eos_token_id"] = tokenizer.eos_token_id
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=256,
            rope_scaling={"type": "mrope", "mrope_section": sections},
            **ids,
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=16,
            num_heads=2,
            out_hidden_size=width,
            patch_size=2,
            spatial_merge_size=1,
            temporal_patch_size=1,
            fullatt_block_indexes=[0],
        ),
        **ids,
    )


def build_components(seed: int = 0, num_layers: int = 4) -> dict:
    """The untrained pipeline components, keyword arguments of ``QwenImagePipeline``."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(text_encoder_config(tokenizer)).eval().requires_grad_(False)
    vae = AutoencoderKLQwenImage(
        base_dim=16,  # its causal 3-D convolutions cost ~3 2-D ones on one frame: kept narrow for the CPU build
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],  # one down stage (spatial ×2), no temporal downsampling
        latents_mean=[0.0] * LATENT_CHANNELS,
        latents_std=[1.0] * LATENT_CHANNELS,
    )
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * LATENT_CHANNELS,  # a 2×2 patch of the latent's channels
        out_channels=LATENT_CHANNELS,
        num_layers=num_layers,
        attention_head_dim=32,
        num_attention_heads=2,
        joint_attention_dim=TEXT_WIDTH,
        axes_dims_rope=(8, 12, 12),  # sums to the head dim
    )
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "vae": vae,
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**SCHEDULER_KWARGS),
    }


def build_pipeline(parts: dict):
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------- latents
def vae_moments(vae, images: torch.Tensor) -> torch.Tensor:
    """Images (N, 3, H, W) in [0, 1] -> the VAE posterior's means (N, C, 1, h, w), raw (not normalised)."""
    with torch.no_grad():
        return torch.cat([vae.encode(x[:, :, None] * 2 - 1).latent_dist.mean for x in images.split(512)])


def pack(z: torch.Tensor) -> torch.Tensor:
    """Latents (N, C, 1, h, w) -> the pipeline's packed tokens (N, (h/2)·(w/2), 4·C)."""
    from diffusers import QwenImagePipeline

    n, c, _, h, w = z.shape
    return QwenImagePipeline._pack_latents(z[:, :, 0], n, c, h, w)


def normalized_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Packed latents (N, tokens, 4·C) normalised as the pipeline un-normalises: (z − mean) / std."""
    z = vae_moments(vae, images)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape)
    std = torch.tensor(vae.config.latents_std).view(shape)
    return pack((z - mean) / std)


def train_vae(vae, train: DigitsData, steps: int, batch_size: int, gen, progress: bool) -> torch.Tensor:
    """MSE + 1e-6·KL on single-frame clips; then latents_mean / latents_std = the training latents' per-channel
    moments (the config fields the pipeline normalises with). Returns those packed, normalised latents."""
    from tqdm.auto import tqdm

    opt, lr_schedule = _one_cycle(vae.parameters(), 2e-3, steps)
    vae.train()
    for _ in tqdm(range(steps), desc="digits-qwen vae", disable=not progress, leave=False):
        idx = torch.randint(0, len(train), (batch_size,), generator=gen)
        vae_step(vae, train.images[idx][:, :, None] * 2 - 1, gen, opt, lr_schedule)  # (B, 3, 1 frame, H, W)
    vae.eval()
    z = vae_moments(vae, train.images)
    mean, std = z.mean(dim=(0, 2, 3, 4)), z.std(dim=(0, 2, 3, 4))
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    return pack((z - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1))


@torch.no_grad()
def vae_reconstruction_mse(vae, data: DigitsData) -> float:
    """MSE in [0, 1] pixel space of decode(mean latent) on ``data``."""
    errs = []
    for x in data.images.split(512):
        recon = (vae.decode(vae.encode(x[:, :, None] * 2 - 1).latent_dist.mean).sample[:, :, 0] + 1) / 2
        errs.append(((recon.clamp(0, 1) - x) ** 2).mean(dim=(1, 2, 3)))
    return torch.cat(errs).mean().item()


# ----------------------------------------------------------------------------- conditioning and objective
@torch.no_grad()
def prompt_conditioning(pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's own ``encode_prompt`` of ``prompts``: embeds (P, L, D) and mask (P, L) (1: a token)."""
    embeds, mask = pipe.encode_prompt(prompts, device=torch.device("cpu"))
    return embeds.float(), torch.ones(embeds.shape[:2]) if mask is None else mask.float()


def velocity(transformer, z_sigma, sigma, embeds, mask) -> torch.Tensor:
    """v_θ(z_σ, σ, c) on packed latents (B, N, 4·C), the pipeline's call (σ is the timestep)."""
    rows = int(z_sigma.shape[1] ** 0.5)
    return transformer(
        hidden_states=z_sigma,
        timestep=sigma,
        encoder_hidden_states=embeds,
        encoder_hidden_states_mask=mask.bool(),
        img_shapes=[[(1, rows, rows)]] * len(z_sigma),
        return_dict=False,
    )[0]


def train_transformer(pipe, latents, prompts, steps: int, batch_size: int, gen, progress: bool):
    """Rectified flow on the transformer, the text encoder frozen (each distinct prompt encoded once);
    returns the EMA copy and the mean training loss of the last 10 % of steps."""
    from tqdm.auto import tqdm

    from rlprox.zoo.sd3 import rectified_flow_loss, rectified_flow_pair

    distinct = list(dict.fromkeys([*prompts, *NEGATIVE_PROMPTS]))
    embeds, mask = prompt_conditioning(pipe, distinct)  # (P, L, D), (P, L): padded to the longest
    index = torch.tensor([distinct.index(p) for p in prompts])
    negative_index = torch.tensor([distinct.index(p) for p in NEGATIVE_PROMPTS])
    transformer = pipe.transformer
    params = list(transformer.parameters())
    opt, lr_schedule = _one_cycle(params, 1e-3, steps, pct_start=0.05)
    ema = copy.deepcopy(transformer).eval()
    ema_params = list(ema.parameters())
    transformer.train()
    losses = []
    bar = tqdm(range(steps), desc="digits-qwen transformer", disable=not progress, leave=False)
    for step in bar:
        idx = torch.randint(0, len(latents), (batch_size,), generator=gen)
        which = index[idx].clone()
        dropped = torch.rand(batch_size, generator=gen) < CFG_DROPOUT
        which[dropped] = negative_index[torch.randint(0, len(negative_index), (int(dropped.sum()),), generator=gen)]
        noise = torch.randn(latents[idx].shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(batch_size, generator=gen))
        z_sigma, v_target = rectified_flow_pair(latents[idx], noise, sigma)
        v_pred = velocity(transformer, z_sigma, sigma, embeds[which], mask[which])
        loss, stats = rectified_flow_loss(v_pred, v_target)
        ema_step(loss, opt, lr_schedule, params, ema_params, step, bar)
        losses.append(stats["loss/flow"])
    tail = losses[-max(1, steps // 10) :]
    return ema.requires_grad_(False), sum(tail) / len(tail)


def train_qwen_pipeline(
    train: DigitsData, vae_steps: int, transformer_steps: int, batch_size: int = 128, seed: int = 0, progress=True
):
    """Build and train the whole pipeline; returns an eval-mode ``QwenImagePipeline`` and the final training
    loss (the mean over the last 10 % of steps)."""
    parts = build_components(seed)
    gen = torch.Generator().manual_seed(seed)
    latents = train_vae(parts["vae"], train, vae_steps, batch_size, gen, progress)
    parts["vae"].requires_grad_(False)
    pipe = build_pipeline(parts)
    pipe.transformer, train_loss = train_transformer(
        pipe, latents, train.prompts, transformer_steps, batch_size, gen, progress
    )
    return pipe, train_loss


@torch.no_grad()
def heldout_flow_loss(pipe, data: DigitsData, seed: int = 0, batch_size: int = 512) -> float:
    """The training objective on ``data`` (no prompt dropout), fixed noise for a seed."""
    from rlprox.zoo.sd3 import rectified_flow_pair

    gen = torch.Generator().manual_seed(seed)
    latents = normalized_latents(pipe.vae, data.images)
    distinct = list(dict.fromkeys(data.prompts))
    embeds, mask = prompt_conditioning(pipe, distinct)
    index = torch.tensor([distinct.index(p) for p in data.prompts])
    total = 0.0
    for start in range(0, len(latents), batch_size):
        z0, which = latents[start : start + batch_size], index[start : start + batch_size]
        noise = torch.randn(z0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(len(z0), generator=gen))
        z_sigma, v_target = rectified_flow_pair(z0, noise, sigma)
        v_pred = velocity(pipe.transformer, z_sigma, sigma, embeds[which], mask[which])
        total += F.mse_loss(v_pred, v_target, reduction="sum").item()
    return total / latents.numel()


@torch.no_grad()
def sample_qwen(pipe, prompts: list[str], seed: int = 0, guidance_scale: float = RECOMMENDED_GUIDANCE):
    """Images (len(prompts), 3, 16, 16) in [0, 1] from the pipeline's own call, deterministic for a seed."""
    cfg = {"true_cfg_scale": guidance_scale, "negative_prompt": " "} if guidance_scale > 1 else {"true_cfg_scale": 1}
    images = pipe(
        prompts,
        height=16,
        width=16,
        num_inference_steps=RECOMMENDED_STEPS,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
        **cfg,
    ).images
    return images.float().clamp(0, 1)


def load_qwen_pipeline(path: str | Path):
    """``QwenImagePipeline.from_pretrained`` on a local path, progress bars off."""
    from diffusers import QwenImagePipeline

    return load_sd_pipeline(path, pipeline_class=QwenImagePipeline)
