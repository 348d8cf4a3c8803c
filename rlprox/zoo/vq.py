"""digits-vq: building the digits world's LlamaGen-style VQ tokenizer (16×16×3 -> 4×4
codes). The model class is ``rlprox.models.llamagen.VQModel``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlprox.models.llamagen import VQModel

__all__ = ["train_vq", "encode_tokens", "reconstruction_mse"]


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
