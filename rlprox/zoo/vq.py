"""digits-vq: a LlamaGen-style VQ image tokenizer, 16×16×3 -> 4×4 codes.

Module and state-dict names follow LlamaGen's ``VQModel`` (``encoder.conv_in``,
``encoder.conv_blocks.N.res.M``, ``encoder.conv_blocks.N.downsample``, ``encoder.mid``,
``encoder.norm_out``, ``encoder.conv_out``, ``quant_conv``, ``quantize.embedding``,
``post_quant_conv`` and the mirrored ``decoder``), so a LlamaGen checkpoint with a
matching config can be loaded from a local path.

Quantiser (l2-normalised codebook, LlamaGen's ``codebook_l2_norm=True``): with
ẑ = z/‖z‖ and ê_k = e_k/‖e_k‖ the code is k* = argmin_k ‖ẑ − ê_k‖² (= argmax cosine),
the loss is ‖sg[ẑ] − ê_k*‖² + β‖ẑ − sg[ê_k*]‖² (β = ``commit_loss_beta``), and the
straight-through estimator passes z_q = ẑ + sg[ê_k* − ẑ] to the decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlprox.zoo.pretrained import ZooModule


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
    """One resolution level: ``res`` blocks, optional ``attn``, then down/upsample."""

    def __init__(self, res: list[nn.Module], resample: nn.Module | None, name: str):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList()
        if resample is not None:
            self.add_module(name, resample)
        self._resample_name = name if resample is not None else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block in self.res:
            h = block(h)
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
            self.conv_blocks.append(_Stage(res, None if last else Downsample(in_ch), "downsample"))
        self.mid = nn.ModuleList(
            [ResnetBlock(in_ch, in_ch, groups, dropout), AttnBlock(in_ch, groups),
             ResnetBlock(in_ch, in_ch, groups, dropout)]
        )
        self.norm_out = _norm(in_ch, groups)
        self.conv_out = nn.Conv2d(in_ch, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.conv_blocks:
            h = stage(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, out_channels, ch, ch_mult, num_res_blocks, z_channels, groups, dropout):
        super().__init__()
        in_ch = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, in_ch, 3, padding=1)
        self.mid = nn.ModuleList(
            [ResnetBlock(in_ch, in_ch, groups, dropout), AttnBlock(in_ch, groups),
             ResnetBlock(in_ch, in_ch, groups, dropout)]
        )
        self.conv_blocks = nn.ModuleList()
        for level, mult in enumerate(reversed(ch_mult)):
            out_ch = ch * mult
            res = []
            for _ in range(num_res_blocks + 1):
                res.append(ResnetBlock(in_ch, out_ch, groups, dropout))
                in_ch = out_ch
            last = level == len(ch_mult) - 1
            self.conv_blocks.append(_Stage(res, None if last else Upsample(in_ch), "upsample"))
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
            codebook_size=codebook_size, codebook_embed_dim=codebook_embed_dim,
            codebook_l2_norm=codebook_l2_norm, commit_loss_beta=commit_loss_beta, ch=ch,
            ch_mult=list(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels,
            norm_groups=norm_groups, dropout=dropout, image_size=image_size,
        )
        self.encoder = Encoder(3, ch, ch_mult, num_res_blocks, z_channels, norm_groups, dropout)
        self.decoder = Decoder(3, ch, ch_mult, num_res_blocks, z_channels, norm_groups, dropout)
        self.quantize = VectorQuantizer(
            codebook_size, codebook_embed_dim, commit_loss_beta, codebook_l2_norm
        )
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


def train_vq(train, steps: int, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
             progress: bool = True, **config) -> VQModel:
    """MSE reconstruction + VQ loss, AdamW one-cycle."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = VQModel(**config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    model.train()
    bar = tqdm(range(steps), desc="digits-vq", disable=not progress, leave=False)
    for _ in bar:
        x = train.images[torch.randint(0, len(train), (batch_size,), generator=gen)]
        recon, vq_loss = model(x)
        loss = F.mse_loss(recon, x) + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return model.eval()


@torch.no_grad()
def encode_tokens(model: VQModel, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """images (N,3,16,16) -> token ids (N, h·w) in raster order."""
    return torch.cat([model.encode(x)[2].flatten(1) for x in images.split(batch_size)])


@torch.no_grad()
def reconstruction_mse(model: VQModel, images: torch.Tensor) -> float:
    errs = [((model.decode_code(encode_tokens(model, x)) - x) ** 2).mean(dim=(1, 2, 3))
            for x in images.split(512)]
    return torch.cat(errs).mean().item()
