"""digits-gpt: building the digits world's LlamaGen-style class-conditional GPT over
digits-vq tokens. Class c = digit·5 + colour (50 classes, + the null class for CFG).
The model class and sampling are ``rlprox.models.llamagen``'s."""

from __future__ import annotations

import torch

from rlprox.models.llamagen import Transformer

__all__ = ["train_gpt"]


def train_gpt(
    tokens,
    classes,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    **config,
) -> Transformer:
    """Next-token cross-entropy on (class, tokens) pairs; AdamW (wd 0.01) one-cycle."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Transformer(block_size=tokens.shape[1], **config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    model.train()
    bar = tqdm(range(steps), desc="digits-gpt", disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randint(0, len(tokens), (batch_size,), generator=gen)
        seq = tokens[idx]
        _, loss = model(seq[:, :-1], classes[idx], targets=seq, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()
