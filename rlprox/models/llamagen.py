"""LlamaGen's image tokenizer (``VQModel``) and class-conditional GPT (``Transformer``),
sampling with a KV cache and classifier-free guidance, and loading LlamaGen checkpoints.

Module and state-dict names follow LlamaGen's ``tokenizer/tokenizer_image/vq_model.py``
and ``autoregressive/models/gpt.py``, so ``load_vq`` / ``load_gpt`` read a real
LlamaGen checkpoint (``{"model": …}``, ``{"ema": …}``, ``{"module": …}`` or a bare state
dict) from a local file with the configs below (GPT-B … GPT-XXL, VQ-16/VQ-8); the
digits world (rlprox.zoo) builds tiny configs of the same classes.

VQ (l2-normalised codebook, LlamaGen's ``codebook_l2_norm=True``): with ẑ = z/‖z‖ and
ê_k = e_k/‖e_k‖ the code is k* = argmin_k ‖ẑ − ê_k‖² (= argmax cosine), the loss is
‖sg[ẑ] − ê_k*‖² + β‖ẑ − sg[ê_k*]‖² (β = ``commit_loss_beta``), and the straight-through
estimator passes z_q = ẑ + sg[ê_k* − ẑ] to the decoder. Attention blocks sit at the
lowest resolution of encoder and decoder, as in LlamaGen.

GPT (LlamaGen c2i): pre-norm decoder with RMSNorm, SwiGLU feed-forward
w2(silu(w1 x) ⊙ w3 x), fused ``wqkv``, 2-D rotary embeddings over the token grid and a
class-token prefix. Row ``num_classes`` of the class table is the null class,
substituted with probability ``class_dropout_prob`` in training, so sampling can use
classifier-free guidance on the logits: ℓ = ℓ_uncond + s·(ℓ_cond − ℓ_uncond).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rlprox.models.pretrained import ZooModule


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1×1 q/k/v/proj_out convs."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # (B,HW,C)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3×3 conv with asymmetric (right/bottom) padding: H -> H/2 exactly."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest ×2 then 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Stage(nn.Module):
    """One resolution level: ``res`` blocks, each followed by its ``attn`` block at the
    lowest resolution (as in LlamaGen), then down/upsample."""

    def __init__(self, res: list[nn.Module], attn: list[nn.Module], resample: nn.Module | None, name: str):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        if resample is not None:
            self.add_module(name, resample)
        self._resample_name = name if resample is not None else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        if self._resample_name is not None:
            h = getattr(self, self._resample_name)(h)
        return h


class Encoder(nn.Module):
    def __init__(self, in_channels, ch, ch_mult, num_res_blocks, z_channels, groups, dropout):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        in_ch = ch
        for level, mult in enumerate(ch_mult):
            out_ch = ch * mult
            res = []
            for _ in range(num_res_blocks):
                res.append(ResnetBlock(in_ch, out_ch, groups, dropout))
                in_ch = out_ch
            last = level == len(ch_mult) - 1
            attn = [AttnBlock(out_ch, groups) for _ in res] if last else []
            self.conv_blocks.append(_Stage(res, attn, None if last else Downsample(in_ch), "downsample"))
        self.mid = _mid_block(in_ch, groups, dropout)
        self.norm_out = _norm(in_ch, groups)
        self.conv_out = nn.Conv2d(in_ch, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.conv_blocks:
            h = stage(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _mid_block(channels: int, groups: int, dropout: float) -> nn.ModuleList:
    """The encoder's and decoder's middle: resnet, attention, resnet (LlamaGen's ``mid``)."""
    return nn.ModuleList(
        [
            ResnetBlock(channels, channels, groups, dropout),
            AttnBlock(channels, groups),
            ResnetBlock(channels, channels, groups, dropout),
        ]
    )


class Decoder(nn.Module):
    def __init__(self, out_channels, ch, ch_mult, num_res_blocks, z_channels, groups, dropout):
        super().__init__()
        in_ch = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, in_ch, 3, padding=1)
        self.mid = _mid_block(in_ch, groups, dropout)
        self.conv_blocks = nn.ModuleList()
        for level, mult in enumerate(reversed(ch_mult)):
            out_ch = ch * mult
            res = []
            for _ in range(num_res_blocks + 1):
                res.append(ResnetBlock(in_ch, out_ch, groups, dropout))
                in_ch = out_ch
            last = level == len(ch_mult) - 1
            attn = [AttnBlock(out_ch, groups) for _ in res] if level == 0 else []
            self.conv_blocks.append(_Stage(res, attn, None if last else Upsample(in_ch), "upsample"))
        self.norm_out = _norm(in_ch, groups)
        self.conv_out = nn.Conv2d(in_ch, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for stage in self.conv_blocks:
            h = stage(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, n_e: int, e_dim: int, beta: float, l2_norm: bool = True):
        super().__init__()
        self.n_e, self.e_dim, self.beta, self.l2_norm = n_e, e_dim, beta, l2_norm
        self.embedding = nn.Embedding(n_e, e_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        if l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, dim=-1)

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def forward(self, z: torch.Tensor):
        """z (B,C,H,W) -> (z_q (B,C,H,W), loss, indices (B,H,W))."""
        b, c, h, w = z.shape
        z = z.permute(0, 2, 3, 1)  # (B,H,W,C)
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        codes = self.codebook()  # (K, C)
        flat = z.reshape(-1, c)
        dist = (flat**2).sum(1, keepdim=True) + (codes**2).sum(1) - 2 * flat @ codes.t()
        indices = dist.argmin(1)  # (BHW,)
        z_q = codes[indices].view(b, h, w, c)
        loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z_q.detach(), z)
        z_q = z + (z_q - z).detach()  # straight-through
        return z_q.permute(0, 3, 1, 2).contiguous(), loss, indices.view(b, h, w)

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B,H,W) -> z_q (B,C,H,W)."""
        return self.codebook()[indices].permute(0, 3, 1, 2).contiguous()


class VQModel(ZooModule):
    """LlamaGen-style VQ autoencoder. Images are in [0,1] outside, [-1,1] inside."""

    def __init__(
        self,
        codebook_size: int = 128,
        codebook_embed_dim: int = 8,
        codebook_l2_norm: bool = True,
        commit_loss_beta: float = 0.25,
        ch: int = 16,
        ch_mult: tuple[int, ...] | list[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        z_channels: int = 32,
        norm_groups: int = 8,
        dropout: float = 0.0,
        image_size: int = 16,
    ):
        super().__init__()
        ch_mult = tuple(ch_mult)
        self.config = dict(
            codebook_size=codebook_size,
            codebook_embed_dim=codebook_embed_dim,
            codebook_l2_norm=codebook_l2_norm,
            commit_loss_beta=commit_loss_beta,
            ch=ch,
            ch_mult=list(ch_mult),
            num_res_blocks=num_res_blocks,
            z_channels=z_channels,
            norm_groups=norm_groups,
            dropout=dropout,
            image_size=image_size,
        )
        self.encoder = Encoder(3, ch, ch_mult, num_res_blocks, z_channels, norm_groups, dropout)
        self.decoder = Decoder(3, ch, ch_mult, num_res_blocks, z_channels, norm_groups, dropout)
        self.quantize = VectorQuantizer(codebook_size, codebook_embed_dim, commit_loss_beta, codebook_l2_norm)
        self.quant_conv = nn.Conv2d(z_channels, codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(codebook_embed_dim, z_channels, 1)

    @property
    def token_grid(self) -> int:
        """Side of the token grid: image_size / 2^(levels-1) (4 for 16×16 images)."""
        return self.config["image_size"] // 2 ** (len(self.config["ch_mult"]) - 1)

    def encode(self, images: torch.Tensor):
        """images (B,3,H,W) in [0,1] -> (z_q, vq loss, indices (B,h,w))."""
        return self.quantize(self.quant_conv(self.encoder(images * 2 - 1)))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q (B,C,h,w) -> images (B,3,H,W), unclamped, ≈[0,1]."""
        return (self.decoder(self.post_quant_conv(z_q)) + 1) / 2

    def decode_code(self, indices: torch.Tensor) -> torch.Tensor:
        """indices (B,h,w) or (B,h·w) -> images (B,3,H,W) clamped to [0,1]."""
        if indices.dim() == 2:
            side = self.token_grid
            indices = indices.view(-1, side, side)
        return self.decode(self.quantize.get_codebook_entry(indices)).clamp(0, 1)

    def forward(self, images: torch.Tensor):
        """images in [0,1] -> (reconstruction, vq loss)."""
        z_q, loss, _ = self.encode(images)
        return self.decode(z_q), loss


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · weight."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    def __init__(self, dim: int, multiple_of: int, ffn_dim_multiplier: float | None, dropout: float = 0.0):
        super().__init__()
        hidden = int(2 * (4 * dim) / 3)
        if ffn_dim_multiplier is not None:
            hidden = int(ffn_dim_multiplier * hidden)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def precompute_freqs_cis_2d(grid_size: int, head_dim: int, base: float, cls_token_num: int):
    """(cls_token_num + grid², head_dim/2, 2) table of (cos, sin) for 2-D RoPE.

    Half of each head's rotation pairs encode the row, half the column, with
    frequencies θ_j = base^(−2j / (head_dim/2)). As in LlamaGen, class-token positions
    get an all-zero table, i.e. their q and k are zeroed (they still pass values).
    """
    half = head_dim // 2
    freqs = 1.0 / base ** (torch.arange(0, half, 2)[: half // 2].float() / half)  # (head_dim/4,)
    t = torch.arange(grid_size, dtype=torch.float32)
    angles = torch.outer(t, freqs)  # (G, head_dim/4)
    grid = torch.cat(
        [angles[:, None, :].expand(-1, grid_size, -1), angles[None, :, :].expand(grid_size, -1, -1)],
        dim=-1,
    )  # (G, G, head_dim/2): row angles then column angles
    table = torch.stack([grid.cos(), grid.sin()], dim=-1).flatten(0, 1)  # (G², head_dim/2, 2)
    return torch.cat([torch.zeros(cls_token_num, half, 2), table])


def apply_rotary_emb(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x (B,T,H,D), freqs (T,D/2,2): rotate each consecutive pair (x₀,x₁) by its angle."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs[None, :, None]  # (1,T,1,D/2,2)
    out = torch.stack(
        [xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1], xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1]],
        dim=-1,
    )
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, n_kv_head: int, attn_dropout: float = 0.0, resid_dropout: float = 0.0):
        super().__init__()
        self.attn_dropout_p = attn_dropout
        self.resid_dropout = nn.Dropout(resid_dropout)
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, dim // n_head
        self.wqkv = nn.Linear(dim, (n_head + 2 * n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None  # not in state dict

    def forward(self, x, freqs, input_pos=None):
        b, t, _ = x.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([q_dim, kv_dim, kv_dim], dim=-1)
        q = apply_rotary_emb(q.view(b, t, self.n_head, self.head_dim), freqs).transpose(1, 2)
        k = apply_rotary_emb(k.view(b, t, self.n_kv_head, self.head_dim), freqs).transpose(1, 2)
        v = v.view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B,Hkv,T,D)
        if input_pos is None:
            mask, causal = None, True
        else:  # write this step's keys/values into the cache, attend to positions ≤ input_pos
            k_cache, v_cache = self.kv_cache
            k_cache[:b, :, input_pos] = k
            v_cache[:b, :, input_pos] = v
            k, v = k_cache[:b], v_cache[:b]
            mask = torch.arange(k.shape[2], device=x.device)[None, :] <= input_pos[:, None]  # (T, Tmax)
            causal = False
        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        drop = self.attn_dropout_p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=drop)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(b, t, -1)))


class TransformerBlock(nn.Module):
    def __init__(
        self,
        dim,
        n_head,
        n_kv_head,
        multiple_of,
        ffn_dim_multiplier,
        norm_eps,
        attn_dropout=0.0,
        resid_dropout=0.0,
        ffn_dropout=0.0,
    ):
        super().__init__()
        self.attention = Attention(dim, n_head, n_kv_head, attn_dropout, resid_dropout)
        self.feed_forward = FeedForward(dim, multiple_of, ffn_dim_multiplier, ffn_dropout)
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.ffn_norm = RMSNorm(dim, norm_eps)

    def forward(self, x, freqs, input_pos=None):
        h = x + self.attention(self.attention_norm(x), freqs, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class id -> (B,1,dim); row ``num_classes`` is the null class used for CFG."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(self, labels: torch.Tensor, train: bool, generator=None) -> torch.Tensor:
        if train and self.dropout_prob > 0:
            device = generator.device if generator is not None else labels.device
            drop = (torch.rand(labels.shape, generator=generator, device=device) < self.dropout_prob).to(labels.device)
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels).unsqueeze(1)


class Transformer(ZooModule):
    """Class-conditional GPT. ``block_size`` = number of image tokens (grid²).
    Dropouts (token embeddings, attention, residual, feed-forward) are LlamaGen's;
    they act only in ``train()`` mode."""

    def __init__(
        self,
        dim: int = 96,
        n_layer: int = 3,
        n_head: int = 4,
        n_kv_head: int | None = None,
        multiple_of: int = 32,
        ffn_dim_multiplier: float | None = None,
        rope_base: float = 10000.0,
        norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        num_classes: int = 50,
        class_dropout_prob: float = 0.1,
        vocab_size: int = 128,
        cls_token_num: int = 1,
        block_size: int = 16,
        token_dropout_p: float = 0.0,
        attn_dropout_p: float = 0.0,
        resid_dropout_p: float = 0.0,
        ffn_dropout_p: float = 0.0,
    ):
        super().__init__()
        n_kv_head = n_kv_head or n_head
        self.config = dict(
            dim=dim,
            n_layer=n_layer,
            n_head=n_head,
            n_kv_head=n_kv_head,
            multiple_of=multiple_of,
            ffn_dim_multiplier=ffn_dim_multiplier,
            rope_base=rope_base,
            norm_eps=norm_eps,
            initializer_range=initializer_range,
            num_classes=num_classes,
            class_dropout_prob=class_dropout_prob,
            vocab_size=vocab_size,
            cls_token_num=cls_token_num,
            block_size=block_size,
            token_dropout_p=token_dropout_p,
            attn_dropout_p=attn_dropout_p,
            resid_dropout_p=resid_dropout_p,
            ffn_dropout_p=ffn_dropout_p,
        )
        head_dim = dim // n_head
        if dim % n_head or head_dim % 4:
            raise ValueError(f"dim/n_head must be an integer divisible by 4 (got {dim}/{n_head})")
        grid = int(round(block_size**0.5))
        if grid * grid != block_size:
            raise ValueError(f"block_size must be a square grid (got {block_size})")
        self.num_classes, self.cls_token_num, self.block_size = num_classes, cls_token_num, block_size
        self.cls_embedding = LabelEmbedder(num_classes, dim, class_dropout_prob)
        self.tok_embeddings = nn.Embedding(vocab_size, dim)
        self.tok_dropout = nn.Dropout(token_dropout_p)
        self.layers = nn.ModuleList(
            TransformerBlock(
                dim,
                n_head,
                n_kv_head,
                multiple_of,
                ffn_dim_multiplier,
                norm_eps,
                attn_dropout_p,
                resid_dropout_p,
                ffn_dropout_p,
            )
            for _ in range(n_layer)
        )
        self.norm = RMSNorm(dim, norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        self.register_buffer(
            "freqs_cis",
            precompute_freqs_cis_2d(grid, head_dim, rope_base, cls_token_num),
            persistent=False,
        )
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=initializer_range)
        nn.init.zeros_(self.output.weight)

    def setup_caches(self, max_batch_size: int) -> None:
        """Allocate per-layer KV caches for cls_token_num + block_size positions, on the
        model's device and in its dtype."""
        seq = self.cls_token_num + self.block_size
        weight = self.tok_embeddings.weight
        for layer in self.layers:
            att = layer.attention
            shape = (max_batch_size, att.n_kv_head, seq, att.head_dim)
            att.kv_cache = (
                torch.zeros(shape, device=weight.device, dtype=weight.dtype),
                torch.zeros(shape, device=weight.device, dtype=weight.dtype),
            )

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None

    def forward(self, idx, cond_idx, input_pos=None, targets=None, generator=None):
        """Three modes, as in LlamaGen:

        - full sequence (``input_pos`` None): idx (B,T) tokens 0..T-1, cond_idx (B,) ->
          logits (B,T+1,V) predicting tokens 0..T; with ``targets`` (B,T+1) also the
          cross-entropy loss;
        - cached prefill: idx None, cond_idx (B,), input_pos = arange(cls_token_num);
        - cached decode: idx (B,1), cond_idx None, input_pos = (position,).
        """
        if input_pos is None:
            h = self.cls_embedding(cond_idx, train=self.training, generator=generator)
            h = self.tok_dropout(torch.cat([h[:, : self.cls_token_num], self.tok_embeddings(idx)], dim=1))
            freqs = self.freqs_cis[: h.shape[1]]
        elif idx is None:
            h = self.cls_embedding(cond_idx, train=False)[:, : self.cls_token_num]
            freqs = self.freqs_cis[input_pos]
        else:
            h = self.tok_embeddings(idx)
            freqs = self.freqs_cis[input_pos]
        for layer in self.layers:
            h = layer(h, freqs, input_pos)
        logits = self.output(self.norm(h)).float()
        if input_pos is None:
            logits = logits[:, self.cls_token_num - 1 :]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss


def sample_logits(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """logits (B,V) -> token ids (B,): temperature, then top-k / nucleus filtering. ``generator``: one
    torch.Generator, or a list of B (row i drawn from the i-th, as a batch of one would be)."""
    logits = logits / max(temperature, 1e-5)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum - sorted_logits.softmax(-1) > top_p  # keep the token crossing top_p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.float().softmax(-1)
    if isinstance(generator, (list, tuple)):  # one generator per row: row i draws as it would alone
        rows = [torch.multinomial(p[None].to(g.device), 1, generator=g)[0] for p, g in zip(probs, generator)]
        return torch.cat(rows).to(logits.device)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(logits.device)


@torch.no_grad()
def generate(
    model: Transformer,
    cond_idx: torch.Tensor,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Sample (B, block_size) token ids for classes cond_idx (B,); ``generator``: one, or one per row.

    With cfg_scale ≠ 1 the batch is doubled with the null class and the logits combined
    as ℓ_u + s·(ℓ_c − ℓ_u). ``use_cache=False`` recomputes the full prefix each step
    (the reference the KV-cache path is tested against).
    """
    model.eval()
    b = cond_idx.shape[0]
    cfg = cfg_scale != 1.0
    if cfg and model.cls_embedding.embedding_table.num_embeddings <= model.num_classes:
        raise ValueError("cfg_scale != 1 needs a null class (train with class_dropout_prob > 0)")
    cond = torch.cat([cond_idx, torch.full_like(cond_idx, model.num_classes)]) if cfg else cond_idx
    device = cond_idx.device
    tokens = torch.zeros(b, 0, dtype=torch.long, device=device)

    def next_token(logits):  # logits (B or 2B, V)
        if cfg:
            c, u = logits.split(b)
            logits = u + cfg_scale * (c - u)
        return sample_logits(logits, temperature, top_k, top_p, generator)

    if use_cache:
        model.setup_caches(cond.shape[0])
        try:
            n_cls = model.cls_token_num
            logits, _ = model(None, cond, input_pos=torch.arange(n_cls, device=device))
            tok = next_token(logits[:, -1])
            tokens = tok[:, None]
            for i in range(1, model.block_size):
                step_in = torch.cat([tok, tok])[:, None] if cfg else tok[:, None]
                logits, _ = model(step_in, None, input_pos=torch.tensor([n_cls + i - 1], device=device))
                tok = next_token(logits[:, -1])
                tokens = torch.cat([tokens, tok[:, None]], dim=1)
        finally:
            model.clear_caches()
    else:
        for _ in range(model.block_size):
            seq = torch.cat([tokens, tokens]) if cfg else tokens
            logits, _ = model(seq, cond)
            tok = next_token(logits[:, -1])
            tokens = torch.cat([tokens, tok[:, None]], dim=1)
    return tokens


# ----------------------------------------------------------------------------- teacher forcing


def noisy_context(
    tokens: torch.Tensor, noise_prob: float, vocab_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The context (B, T − 1) of a teacher-forced pass over ``tokens`` (B, T): one
    forward pass on it gives the logits of every position given its prefix (position i
    sees the class token and tokens < i).

    ``noise_prob`` = ξ > 0 is VA-π's "noisy context": each context token is replaced by
    a uniform random code in [0, ``vocab_size``) with probability ξ (the targets stay clean).
    """
    context = tokens[:, :-1]
    if noise_prob <= 0:
        return context
    device = generator.device if generator is not None else tokens.device
    swap = torch.rand(context.shape, generator=generator, device=device).to(tokens.device) < noise_prob
    random = torch.randint(0, vocab_size, context.shape, generator=generator, device=device).to(tokens.device)
    return torch.where(swap, random, context)


def token_logp(logp_all: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """log π of sampled sequences: logp_all (B, T, V) log-softmax, samples (B, G, T) -> (B, G, T)."""
    G = samples.shape[1]
    return logp_all.unsqueeze(1).expand(-1, G, -1, -1).gather(-1, samples.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def group_sample(
    logits: torch.Tensor, group_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """VA-π's teacher-forced group sampling: G sequences per row of ``logits`` (B, T, V),
    every position drawn independently from its own categorical softmax(logits[b, t]).
    Returns (samples (B, G, T), their per-token log-probs (B, G, T))."""
    B, T, V = logits.shape
    logp_all = torch.log_softmax(logits.float(), -1)
    probs = logp_all.exp().reshape(B * T, V)
    device = generator.device if generator is not None else probs.device
    draws = torch.multinomial(probs.to(device), group_size, replacement=True, generator=generator).to(
        logits.device
    )  # (B·T, G)
    samples = draws.view(B, T, group_size).permute(0, 2, 1).contiguous()
    return samples, token_logp(logp_all, samples)


# ----------------------------------------------------------------------------- LlamaGen configs and checkpoints

GPT_CONFIGS = {  # LlamaGen's GPT_models (c2i): depth, heads, width
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),
}
GPT_DEFAULTS = dict(
    multiple_of=256,
    norm_eps=1e-5,
    rope_base=10000.0,
    num_classes=1000,
    class_dropout_prob=0.1,
    vocab_size=16384,
    cls_token_num=1,
    token_dropout_p=0.1,
    resid_dropout_p=0.1,
    ffn_dropout_p=0.1,
)
VQ_CONFIGS = {  # LlamaGen's VQ_models: channel multipliers (downsampling 2^(len − 1))
    "VQ-16": dict(ch_mult=[1, 1, 2, 2, 4]),
    "VQ-8": dict(ch_mult=[1, 2, 2, 4]),
}
VQ_DEFAULTS = dict(
    codebook_size=16384,
    codebook_embed_dim=8,
    codebook_l2_norm=True,
    commit_loss_beta=0.25,
    ch=128,
    num_res_blocks=2,
    z_channels=256,
    norm_groups=32,
)
IGNORED_KEYS = ("quantize.codebook_used", "freqs_cis")  # usage statistics / recomputed tables


def read_llamagen_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a LlamaGen checkpoint file: the ``model``, ``ema``, ``module`` or
    ``state_dict`` entry (or the file itself), with DDP/compile prefixes stripped and
    usage buffers dropped. Loaded with ``weights_only=True``: no code runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LlamaGen checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "ema", "module", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            k = k[len(prefix) :] if k.startswith(prefix) else k
        if not k.endswith(IGNORED_KEYS):
            out[k] = v
    return out


def llamagen_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The inverse of ``read_llamagen_state_dict``: the model's persistent tensors under
    LlamaGen's parameter names (this module uses them unchanged, so the reader's mapping
    is stripping prefixes, and its inverse adds none), detached, contiguous, on the CPU.
    The rotary table stays out, as LlamaGen recomputes it."""
    return {
        k: v.detach().to("cpu").contiguous().clone()
        for k, v in model.state_dict().items()
        if not k.endswith(IGNORED_KEYS)
    }


def save_llamagen_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """``torch.save({"model": state dict})``: the layout LlamaGen's training scripts
    write and its sampling scripts (``--gpt-ckpt`` / ``--vq-ckpt``) and
    ``read_llamagen_state_dict`` read. Tensors only: loadable with ``weights_only=True``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": llamagen_state_dict(model)}, path)
    return path


def gpt_config(name: str, image_size: int = 256, downsample: int = 16, **overrides) -> dict:
    """Constructor keywords of a LlamaGen GPT config for images of ``image_size``."""
    if name not in GPT_CONFIGS:
        raise ValueError(f"unknown GPT config {name!r}; known: {', '.join(GPT_CONFIGS)}")
    grid = image_size // downsample
    return {**GPT_DEFAULTS, **GPT_CONFIGS[name], "block_size": grid * grid, **overrides}


def vq_config(name: str, image_size: int = 256, **overrides) -> dict:
    if name not in VQ_CONFIGS:
        raise ValueError(f"unknown VQ config {name!r}; known: {', '.join(VQ_CONFIGS)}")
    return {**VQ_DEFAULTS, **VQ_CONFIGS[name], "image_size": image_size, **overrides}


def load_gpt(path: str | Path, config: dict) -> Transformer:
    """A ``Transformer(**config)`` with the weights of a LlamaGen checkpoint (strict)."""
    model = Transformer(**config)
    model.load_state_dict(read_llamagen_state_dict(path), strict=True)
    return model.eval()


def load_vq(path: str | Path, config: dict) -> VQModel:
    model = VQModel(**config)
    model.load_state_dict(read_llamagen_state_dict(path), strict=True)
    return model.eval()
