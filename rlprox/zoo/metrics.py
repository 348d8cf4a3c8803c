"""Offline image-quality proxies on digits-classifier features.

``fid_proxy``, ``kid_proxy`` and ``is_proxy`` follow the FID, KID and Inception Score
formulas but replace Inception-v3 with the 64-d penultimate layer (and the digit head)
of the digits-classifier. They are **offline proxies for before/after comparisons
inside the digits world only**: the numbers are not comparable with published FID/KID/IS
values, and (like FID) the FID proxy is strongly biased at small N — compare only
at the same N and report the real-vs-real floor (``fid_floor``) next to it.

- FID:  ‖μ_r − μ_g‖² + Tr(Σ_r + Σ_g − 2(Σ_r^½ Σ_g Σ_r^½)^½)
- KID:  unbiased MMD² with the cubic kernel k(x,y) = (xᵀy/d + 1)³, averaged over subsets
        (features rescaled by the real set's RMS so the kernel is O(1))
- IS:   exp E_x KL(p(y|x) ‖ p(y)) over the 10 digit classes (max 10)
"""

from __future__ import annotations

import numpy as np
import torch

from rlprox.zoo.data import DigitsData


@torch.no_grad()
def classifier_features(classifier, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(N,3,H,W) images in [0,1] -> (N, feature_dim) float64 features."""
    classifier.eval()
    return torch.cat([classifier.features(x) for x in images.split(batch_size)]).double()


def _as_features(x: torch.Tensor, classifier) -> torch.Tensor:
    if x.dim() == 4:
        if classifier is None:
            raise ValueError("images given without a classifier to compute features")
        return classifier_features(classifier, x)
    return x.double()


def _sqrtm_psd(m: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((m + m.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def fid_proxy(real: torch.Tensor, fake: torch.Tensor, classifier=None) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets.

    ``real``/``fake`` are features (N,d) or images (N,3,H,W) (then ``classifier`` is
    required). The trace term uses Tr((Σ_r^½ Σ_g Σ_r^½)^½), symmetric PSD, so it is
    computed exactly from eigenvalues in float64.
    """
    a = _as_features(real, classifier).cpu().numpy()
    b = _as_features(fake, classifier).cpu().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrtm_psd(cov_a)
    inner = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_sqrt = np.sqrt(np.clip(inner, 0, None)).sum()
    fid = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    return float(max(fid, 0.0))


def kid_proxy(
    real: torch.Tensor, fake: torch.Tensor, classifier=None, subsets: int = 10, subset_size: int = 200, seed: int = 0
) -> float:
    """Mean over random subsets of the unbiased MMD² with the cubic polynomial kernel.

    Both feature sets are divided by the real set's RMS feature value, so that xᵀy/d is
    O(1) as with Inception features (the classifier's raw features have norm ≈100,
    which would put the cubic kernel at ~10⁶ and KID in the tens of thousands).
    """
    a = _as_features(real, classifier)
    b = _as_features(fake, classifier)
    d = a.shape[1]
    scale = a.pow(2).mean().sqrt().clamp_min(1e-12)
    a, b = a / scale, b / scale
    m = min(subset_size, len(a), len(b))
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=gen)[:m]]
        y = b[torch.randperm(len(b), generator=gen)[:m]]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        off = 1 - torch.eye(m, dtype=kxx.dtype)
        mmd = (kxx * off).sum() / (m * (m - 1)) + (kyy * off).sum() / (m * (m - 1)) - 2 * kxy.mean()
        values.append(mmd.item())
    return float(np.mean(values))


@torch.no_grad()
def is_proxy(images: torch.Tensor, classifier) -> float:
    """exp(E_x KL(p(digit|x) ‖ p(digit))); 1 (no information) … 10 (confident, balanced)."""
    p, _ = classifier.eval().predict_proba(images)
    p = p.double().clamp_min(1e-12)
    marginal = p.mean(0, keepdim=True)
    return float(torch.exp((p * (p.log() - marginal.log())).sum(1).mean()))


@torch.no_grad()
def conditional_accuracy(
    images: torch.Tensor, digits: torch.Tensor, colours: torch.Tensor, classifier
) -> dict[str, float]:
    """How often generated images show what was asked for.

    Returns digit_acc, colour_acc, joint_acc (both argmaxes right) and alignment, the
    mean of P(prompted digit)·P(prompted colour) (the ``digits_alignment`` reward).
    """
    p_digit, p_colour = classifier.eval().predict_proba(images)
    digit_ok = p_digit.argmax(-1) == digits
    colour_ok = p_colour.argmax(-1) == colours
    align = p_digit.gather(1, digits[:, None])[:, 0] * p_colour.gather(1, colours[:, None])[:, 0]
    return {
        "digit_acc": digit_ok.float().mean().item(),
        "colour_acc": colour_ok.float().mean().item(),
        "joint_acc": (digit_ok & colour_ok).float().mean().item(),
        "alignment": align.mean().item(),
    }


def real_like(pool: DigitsData, classes: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """One random ``pool`` image of each requested joint class (digit·5 + colour).

    The output of a perfect generator asked for ``classes``: the sample to compute a
    real-vs-real floor from, since FID on these features is dominated by class
    proportions (a random real subset with other proportions scores far worse).
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for c in classes.tolist():
        members = (pool.classes == c).nonzero()[:, 0]
        out.append(members[torch.randint(0, len(members), (1,), generator=gen)].item())
    return pool.images[torch.tensor(out)]


def fid_floor(
    classifier,
    reference: DigitsData,
    pool: DigitsData,
    n: int | None = None,
    classes: torch.Tensor | None = None,
    seed: int = 0,
) -> float:
    """Real-vs-real FID proxy at the same N: ``pool`` images against ``reference``.

    With ``classes`` (the generator's conditioning, N entries) the pool images match
    them class for class (:func:`real_like`), which is what a perfect conditional
    generator would score; otherwise ``n`` random ``pool`` images.
    """
    if classes is not None:
        images = real_like(pool, classes, seed)
    else:
        gen = torch.Generator().manual_seed(seed)
        images = pool.images[torch.randperm(len(pool), generator=gen)[:n]]
    return fid_proxy(reference.images, images, classifier)
