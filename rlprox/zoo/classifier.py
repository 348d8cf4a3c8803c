"""digits-classifier: a small CNN with a digit head and a colour head.

It is the reward model of the digits world (``digits_alignment`` = P(digit)·P(colour))
and the feature network of the offline FID/KID/IS proxies (``features`` returns the
64-d penultimate activations).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rlprox.models.pretrained import ZooModule
from rlprox.zoo.data import COLOUR_NAMES, DIGIT_WORDS, DigitsData


class DigitsClassifier(ZooModule):
    """conv32-conv32-pool-conv64-conv64-pool -> fc(feature_dim) -> {digit, colour} heads."""

    def __init__(self, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim}
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16 -> 8
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8 -> 4
            nn.Flatten(),
            nn.Linear(2 * w * 16, feature_dim),
            nn.ReLU(),
        )
        self.digit_head = nn.Linear(feature_dim, len(DIGIT_WORDS))
        self.colour_head = nn.Linear(feature_dim, len(COLOUR_NAMES))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """images (B,3,16,16) in [0,1] -> penultimate features (B, feature_dim)."""
        if images.shape[-1] != 16 or images.shape[-2] != 16:
            images = F.interpolate(images, size=16, mode="bilinear", align_corners=False)
        return self.body(images)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B,3,16,16) -> (digit logits (B,10), colour logits (B,5))."""
        h = self.features(images)
        return self.digit_head(h), self.colour_head(h)

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor, batch_size: int = 512):
        """(P(digit) (B,10), P(colour) (B,5)), evaluated in batches without grad."""
        digit_p, colour_p = [], []
        for chunk in images.split(batch_size):
            d, c = self(chunk)
            digit_p.append(d.softmax(-1))
            colour_p.append(c.softmax(-1))
        return torch.cat(digit_p), torch.cat(colour_p)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """±1 px roll, brightness ×U(0.8, 1.2), Gaussian noise σ=0.03 (robustness to generators)."""
    b = images.shape[0]
    dy, dx = torch.randint(-1, 2, (2,), generator=generator).tolist()
    images = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
    gain = 0.8 + 0.4 * torch.rand(b, 1, 1, 1, generator=generator)
    noise = 0.03 * torch.randn(images.shape, generator=generator)
    return (images * gain + noise).clamp(0, 1)


@torch.no_grad()
def accuracy(model: DigitsClassifier, data: DigitsData) -> dict[str, float]:
    """Held-out digit and colour accuracy."""
    digit_p, colour_p = model.eval().predict_proba(data.images)
    return {
        "digit_acc": (digit_p.argmax(-1) == data.digits).float().mean().item(),
        "colour_acc": (colour_p.argmax(-1) == data.colours).float().mean().item(),
    }


def train_classifier(
    train: DigitsData,
    steps: int,
    batch_size: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
) -> DigitsClassifier:
    """Cross-entropy on both heads, AdamW with a one-cycle schedule, augmented batches."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    model.train()
    bar = tqdm(range(steps), desc="digits-classifier", disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randint(0, len(train), (batch_size,), generator=gen)
        images = augment(train.images[idx], gen)
        digit_logits, colour_logits = model(images)
        loss = F.cross_entropy(digit_logits, train.digits[idx]) + F.cross_entropy(colour_logits, train.colours[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()
