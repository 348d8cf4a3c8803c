"""digits-vq: building the digits world's LlamaGen-style VQ tokenizer (16×16×3 -> 8×8
codes from a 128-entry codebook). The model class is ``rlprox.models.llamagen.VQModel``.

Two standard fixes keep the codebook alive (without them most codes die and the
reconstructions are too blurry for VA-π's pixel reward to mean anything):
k-means initialisation of the codebook on the first batch's (normalised) encoder
outputs, and dead-code restarts: every ``restart_every`` steps (for the first 80% of
training) each code unused since the last check is moved onto a random encoder output
of the current batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlprox.models.llamagen import VQModel

__all__ = ["train_vq", "encode_tokens", "reconstruction_mse"]


DIGITS_VQ_CONFIG = dict(
    codebook_size=128, codebook_embed_dim=8, ch=16, ch_mult=[1, 2], z_channels=32, norm_groups=8, image_size=16
)


@torch.no_grad()
def kmeans_codebook(
    vectors: torch.Tensor, k: int, iterations: int = 10, generator: torch.Generator | None = None
) -> torch.Tensor:
    """k spherical k-means centres (unit norm) of unit-norm ``vectors`` (N, d)."""
    centres = vectors[torch.randperm(len(vectors), generator=generator)[:k]].clone()
    for _ in range(iterations):
        assign = (vectors @ centres.T).argmax(1)
        for j in range(k):
            members = vectors[assign == j]
            if len(members):
                centres[j] = F.normalize(members.mean(0), dim=0)
    return centres


def train_vq(
    train,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
    restart_every: int = 25,
    **config,
) -> VQModel:
    """MSE reconstruction + VQ loss, AdamW one-cycle; k-means codebook init and
    dead-code restarts (module doc)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = VQModel(**{**DIGITS_VQ_CONFIG, **config})
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    codebook = model.quantize.embedding.weight
    usage = torch.zeros(codebook.shape[0])
    model.train()
    bar = tqdm(range(steps), desc="digits-vq", disable=not progress, leave=False)
    for step in bar:
        x = train.images[torch.randint(0, len(train), (batch_size,), generator=gen)]
        z = model.quant_conv(model.encoder(x * 2 - 1))
        flat = F.normalize(z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=-1)
        if step == 0:
            codebook.data.copy_(kmeans_codebook(flat, codebook.shape[0], generator=gen))
        z_q, vq_loss, indices = model.quantize(z)
        recon = model.decode(z_q)
        loss = F.mse_loss(recon, x) + vq_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        usage += torch.bincount(indices.flatten(), minlength=len(usage))
        if restart_every and (step + 1) % restart_every == 0 and step < 0.8 * steps:
            dead = (usage == 0).nonzero()[:, 0]
            if len(dead):
                codebook.data[dead] = flat[torch.randint(0, len(flat), (len(dead),), generator=gen)]
            usage.zero_()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return model.eval()


@torch.no_grad()
def encode_tokens(model: VQModel, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """images (N,3,16,16) -> token ids (N, h·w) in raster order."""
    return torch.cat([model.encode(x)[2].flatten(1) for x in images.split(batch_size)])


@torch.no_grad()
def reconstruction_mse(model: VQModel, images: torch.Tensor) -> float:
    errs = [((model.decode_code(encode_tokens(model, x)) - x) ** 2).mean(dim=(1, 2, 3)) for x in images.split(512)]
    return torch.cat(errs).mean().item()
