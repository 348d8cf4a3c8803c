"""Proximal operators as pure tensor functions.

Convention everywhere (the step t is already folded in):

    prox_{t·R}(v) = argmin_x  t·R(x) + ½‖x − v‖²

All operators are batched, device- and dtype-agnostic and return a new tensor in the
dtype of ``v``; scalar root solves (SEF / WGSEF) run in float64. Group operators take a
2-D ``v`` whose rows are the groups (callers pass ``W.view(C_out, -1)``: one group per
output neuron / channel).

The sparse-envelope family follows docs/notes/sef-prox.md:
SEF_k is the convex envelope of ½‖x‖² + ι{‖x‖₀ ≤ k}, i.e. the half-squared k-support
norm; WGSEF_k(x) = SEF_k(u) with u_j = √d_j·‖x_{G_j}‖.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _is_scalar(t) -> bool:
    return not isinstance(t, torch.Tensor) or t.numel() == 1


def _as_float(t) -> float:
    return float(t.item()) if isinstance(t, torch.Tensor) else float(t)


def _check_rows(v: torch.Tensor, name: str) -> None:
    if v.dim() != 2:
        raise ValueError(
            f"{name} expects a 2-D tensor whose rows are the groups "
            f"(pass W.view(W.shape[0], -1)); got shape {tuple(v.shape)}"
        )


# --------------------------------------------------------------------------- L1 / L0


def prox_l1(v: torch.Tensor, t) -> torch.Tensor:
    """Soft threshold, prox of t·‖x‖₁ (weighted L1 when t is a tensor).

        x_i = sign(v_i)·max(|v_i| − t_i, 0)

    ``t`` is a scalar or a non-negative tensor broadcastable to ``v``.
    """
    if _is_scalar(t):
        return F.softshrink(v, _as_float(t))
    t = t.to(dtype=v.dtype, device=v.device)
    # one allocation, then in-place passes (avoids materialising −t and v.clamp(−t, t))
    return v.abs().sub_(t).clamp_min_(0).copysign_(v)


def prox_l0(v: torch.Tensor, t) -> torch.Tensor:
    """Hard threshold, prox of t·‖x‖₀ with R(x) = ‖x‖₀ (the count of non-zeros).

        x_i = v_i if |v_i| > √(2t) else 0

    (keeping v_i costs t, dropping it costs ½v_i², so v_i is kept iff ½v_i² > t).
    Note pyproximal's ``L0(sigma).prox(x, tau)`` thresholds at τσ instead of √(2τσ).
    ``t`` is a scalar or a tensor broadcastable to ``v``.
    """
    if _is_scalar(t):
        return F.hardshrink(v, math.sqrt(2.0 * _as_float(t)))
    thresh = torch.sqrt(2.0 * t.to(dtype=v.dtype, device=v.device))
    return torch.where(v.abs() > thresh, v, torch.zeros_like(v))


def project_topk(v: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Keep the k largest values along ``dim`` then ReLU (the rest set to zero).

    x = max(v ⊙ 1{v_i among the k largest}, 0)
    """
    n = v.shape[dim]
    if k >= n:
        return v.clamp_min(0)
    if k <= 0:
        return torch.zeros_like(v)
    vals, idx = torch.topk(v, k, dim=dim)
    return torch.zeros_like(v).scatter_(dim, idx, vals.clamp_min(0))


def project_abs_topk(v: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Euclidean projection onto the L0 ball {‖x‖₀ ≤ k} along ``dim``:
    keep the k entries of largest |v_i| (with their sign), zero the rest."""
    n = v.shape[dim]
    if k >= n:
        return v.clone()
    if k <= 0:
        return torch.zeros_like(v)
    idx = torch.topk(v.abs(), k, dim=dim).indices
    return torch.zeros_like(v).scatter_(dim, idx, v.gather(dim, idx))


# ------------------------------------------------------------------ group L2, EN, nuclear


def prox_group_l2(v: torch.Tensor, t, weights=None) -> torch.Tensor:
    """Block soft threshold, prox of t·Σ_j w_j‖x_{G_j}‖₂ with groups = rows of 2-D ``v``.

        x_{G_j} = max(0, 1 − t·w_j / ‖v_{G_j}‖)·v_{G_j}

    Default group weight w_j = √|G_j| (the row length). ``t`` scalar or shape (m,).
    """
    _check_rows(v, "prox_group_l2")
    if weights is None:
        weights = math.sqrt(v.shape[1])
    norms = torch.linalg.vector_norm(v, dim=1)  # (m,)
    thresh = t * weights
    if isinstance(thresh, torch.Tensor):
        thresh = thresh.to(dtype=v.dtype, device=v.device)
    scale = (1.0 - thresh / norms.clamp_min(torch.finfo(v.dtype).tiny)).clamp_min(0)
    return v * scale.unsqueeze(1)


def prox_elastic_net(v: torch.Tensor, t1, t2) -> torch.Tensor:
    """Prox of R(x) = t1·‖x‖₁ + (t2/2)·‖x‖² (both step sizes already folded in):

    x = soft(v, t1) / (1 + t2)
    """
    out = prox_l1(v, t1)
    return out if _is_scalar(t2) and _as_float(t2) == 0.0 else out.mul_(1.0 / (1.0 + t2))


def prox_nuclear(V: torch.Tensor, t) -> torch.Tensor:
    """Singular value thresholding, prox of t·‖X‖_* (sum of singular values σ_i).

        V = U diag(σ) Vᴴ  →  X = U diag(max(σ − t, 0)) Vᴴ

    Batched over the leading dimensions of ``V`` (…, m, n).
    """
    U, S, Vh = torch.linalg.svd(V, full_matrices=False)
    S = (S - t).clamp_min(0)
    return (U * S.unsqueeze(-2)) @ Vh


# ------------------------------------------------------------------------ SEF / WGSEF


def _sef_of_magnitudes(z: torch.Tensor, k: int) -> torch.Tensor:
    """SEF_k over the last dim of non-negative z (float64), via one sort.

    With z sorted decreasingly (1-based) and T_j = Σ_{i≥j} z_i, for every j ∈ 1..k with
    T_j/(k−j+1) ≥ z_j the choice θ_i = 1 (i < j), θ_i = (k−j+1)·z_i/T_j (i ≥ j) is
    feasible in (‖x‖^sp_k)² = min_{0≤θ≤1, Σθ≤k} Σ z_i²/θ_i, giving the value
    Σ_{i<j} z_i² + T_j²/(k−j+1). The optimum (the unique r = k−j of docs/notes/sef-prox.md) is
    among them, so SEF_k = ½·min over the feasible j. No tie-sensitive equality test.
    """
    d = z.shape[-1]
    if k >= d:
        return 0.5 * (z * z).sum(-1)
    z = torch.sort(z, dim=-1, descending=True).values
    head_sq = torch.cumsum(z * z, dim=-1)  # Σ_{i≤j} z_i² (1-based j = index+1)
    tail = torch.flip(torch.cumsum(torch.flip(z, (-1,)), dim=-1), (-1,))  # T_j
    j = torch.arange(1, k + 1, device=z.device, dtype=z.dtype)  # 1..k
    T = tail[..., :k]
    zj = z[..., :k]
    head = torch.cat([torch.zeros_like(head_sq[..., :1]), head_sq[..., : k - 1]], -1)
    denom = k - j + 1
    cand = head + T * T / denom
    feasible = T / denom >= zj * (1 - 1e-12)
    cand = torch.where(feasible, cand, torch.full_like(cand, math.inf))
    return 0.5 * cand.min(-1).values


def _box_theta(c: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Solve the box-norm prox weights over the last dim (float64 in, float64 out).

    Returns θ_j = clip(α·c_j − b_j, 0, 1) with α > 0 the root of
        g(α) = Σ_j clip(α·c_j − b_j, 0, 1) = k,
    or θ_j = 1{c_j > 0} when at most k of the c_j are non-zero (the constraint Σθ ≤ k
    is then inactive). g is piecewise linear and nondecreasing with breakpoints b_j/c_j
    (slope +c_j starts) and (1+b_j)/c_j (slope −c_j). The breakpoint segment where g
    crosses k is located by sorting all 2m breakpoints (batched inputs, small m:
    O(m log m)) or, for one long vector, by a binary search over a sorted sample of
    breakpoints that narrows to a few hundred candidates (O(m) passes plus a small
    sort, with a few host syncs); g is linear on the segment and α solves it exactly.
    No Python loop over groups.
    """
    active = c > 0
    if c.dim() == 1 and c.shape[0] > _SELECT_MIN and int(active.sum()) > k:
        alpha = _alpha_by_selection(c, b, k)
        return (alpha * c - b).clamp_(0, 1)
    lo, hi = _bracket_by_sort(c, b, k, active)
    theta = _theta_on_segment(c, b, k, active, lo, hi)
    easy = active.sum(-1, keepdim=True) <= k
    return torch.where(easy, active.to(c.dtype), theta)


_SELECT_MIN = 4096  # below this a full sort is cheaper than the selection path's overhead
_SELECT_LEAF = 512  # ~2x this many breakpoints are sampled by the selection path


def _breakpoints(c, b, active=None):
    """Start (b_j/c_j) and end ((1+b_j)/c_j) of each group's linear piece of g."""
    # every b_j > 0, so an inactive group (c_j = 0) gets +inf breakpoints by itself
    return b / c, (1 + b) / c


def _bracket_by_sort(c, b, k, active):
    """(lo, hi): consecutive sorted breakpoints with g(lo) < k ≤ g(hi), batched."""
    start, end = _breakpoints(c, b, active)
    zero = torch.zeros_like(c)
    P = torch.cat([start, end], -1)
    dS = torch.cat([torch.where(active, c, zero), torch.where(active, -c, zero)], -1)
    dI = torch.cat([torch.where(active, -b, zero), torch.where(active, 1 + b, zero)], -1)
    P, order = torch.sort(P, dim=-1)
    S = torch.cumsum(dS.gather(-1, order), -1)
    Icum = torch.cumsum(dI.gather(-1, order), -1)
    g = torch.where(torch.isinf(P), torch.full_like(P, math.inf), S * P + Icum)
    idx = (g < k).sum(-1, keepdim=True).clamp(1, P.shape[-1] - 1)
    lo = P.gather(-1, idx - 1)
    hi = P.gather(-1, idx)
    return lo, torch.where(torch.isinf(hi), lo, hi)


def _alpha_by_selection(c, b, k) -> float:
    """The root α of g(α) = k for one long vector without a full sort.

    Binary-search g over a sorted strided sample of ~1k breakpoints; after the first
    few probes (one O(m) pass each) fold the groups whose breakpoints both left the
    bracket (lo, hi) into constants (#saturated, linear slope and intercept), so later
    probes only touch the undetermined groups. Finally sort the breakpoints left inside
    the bracket, integrate the slope changes across them to find the segment where g
    crosses k, and solve the linear equation on it.
    """
    start, end = _breakpoints(c, b, active=None)
    stride = max(1, c.shape[0] // _SELECT_LEAF)
    sample = torch.cat([start[::stride], end[::stride]])
    sample = torch.sort(sample[torch.isfinite(sample)]).values.tolist()
    lo_i, hi_i, g_lo = -1, len(sample), 0.0  # g(0) = 0 since every b_j > 0
    n_sat, s_lin, b_lin = 0.0, 0.0, 0.0  # folded groups (none yet)
    cu, bu, su, eu = c, b, start, end
    probes = 0
    while hi_i - lo_i > 1:
        mid = (lo_i + hi_i) // 2
        p = sample[mid]
        g_mid = p * s_lin - b_lin + n_sat + float((p * cu - bu).clamp_(0, 1).sum())
        if g_mid < k:
            lo_i, g_lo = mid, g_mid
        else:
            hi_i = mid
        probes += 1
        if probes == 3 or hi_i - lo_i <= 1:
            lo = sample[lo_i] if lo_i >= 0 else 0.0
            hi = sample[hi_i] if hi_i < len(sample) else math.inf
            sat = eu <= lo
            lin = (su <= lo) & (eu >= hi)
            und = ~(sat | lin | (su >= hi))
            n_sat += float(sat.sum())
            s_lin += float((cu * lin).sum())
            b_lin += float((bu * lin).sum())
            cu, su, eu = cu[und], su[und], eu[und]
            bu = bu[und] if bu.dim() else bu
    lo = sample[lo_i] if lo_i >= 0 else 0.0
    hi = sample[hi_i] if hi_i < len(sample) else math.inf
    # undetermined groups with start <= lo < end are linear just right of lo
    slope_lo = s_lin + float((cu * ((su <= lo) & (eu > lo))).sum())
    in_s = (su > lo) & (su < hi)
    in_e = (eu > lo) & (eu < hi)
    p = torch.cat([su[in_s], eu[in_e]])
    dS = torch.cat([cu[in_s], -cu[in_e]])
    p, order = torch.sort(p)
    dS = dS[order]
    slope_after = slope_lo + torch.cumsum(dS, 0)
    slope_before = torch.cat([slope_after.new_tensor([slope_lo]), slope_after[:-1]])
    g = g_lo + torch.cumsum(slope_before * torch.diff(p, prepend=p.new_tensor([lo])), 0)
    i = int((g < k).sum())
    seg_lo = float(p[i - 1]) if i > 0 else lo
    seg_g = float(g[i - 1]) if i > 0 else g_lo
    seg_slope = float(slope_after[i - 1]) if i > 0 else slope_lo
    seg_hi = float(p[i]) if i < p.numel() else hi
    if seg_slope <= 0:  # g flat at k on this segment: any α in it gives the same θ
        return seg_lo if not math.isfinite(seg_hi) else 0.5 * (seg_lo + seg_hi)
    alpha = seg_lo + (k - seg_g) / seg_slope
    return min(max(alpha, seg_lo), seg_hi)


def _theta_on_segment(c, b, k, active, lo, hi):
    """θ from the segment [lo, hi] on which g is linear: read the active set at the
    midpoint and solve α·Σ_lin c − Σ_lin b + #sat = k."""
    mid = 0.5 * (lo + hi)
    z = mid * c - b
    lin = active & (z > 0) & (z < 1)
    sat = active & (z >= 1)
    num = k - sat.sum(-1, keepdim=True).to(c.dtype) + (b * lin).sum(-1, keepdim=True)
    den = (c * lin).sum(-1, keepdim=True)
    alpha = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), mid)
    alpha = torch.minimum(torch.maximum(alpha, lo), hi)
    return (alpha * c - b).clamp(0, 1)


def sef(x: torch.Tensor, k: int) -> torch.Tensor:
    """Sparse envelope function SEF_k(x) = ½(‖x‖^sp_k)² over the last dim.

    With z = |x| sorted decreasingly and r ∈ {0..k−1} such that
    z_{k−r−1} > T_r/(r+1) ≥ z_{k−r}, T_r = Σ_{i≥k−r} z_i:
        SEF_k(x) = ½[Σ_{i<k−r} z_i² + T_r²/(r+1)]
    Equals ½‖x‖² iff x is k-sparse; k = 1 gives ½‖x‖₁². Batched over leading dims.
    Computed in float64, returned in x's dtype.
    """
    if k < 1:
        raise ValueError(f"sef: k must be >= 1 (got {k})")
    return _sef_of_magnitudes(x.abs().double(), k).to(x.dtype)


def prox_sef(v: torch.Tensor, k: int, t) -> torch.Tensor:
    """Prox of t·SEF_k over the last dim (box-norm form, McDonald–Pontil–Stamos).

    With a_i = |v_i|: if ‖v‖₀ ≤ k, x = v/(1+t). Otherwise find α > 0 with
    Σ_i clip(α·a_i − t, 0, 1) = k, set θ_i = clip(α·a_i − t, 0, 1) and
        x_i = v_i·θ_i / (θ_i + t).
    θ_i = 1 → ridge, 0 < θ_i < 1 → soft threshold at t/α, θ_i = 0 → zero.
    Exactly k-sparse iff a_[k]/a_[k+1] ≥ 1 + 1/t. Root solve in float64.
    """
    if k < 1:
        raise ValueError(f"prox_sef: k must be >= 1 (got {k})")
    t = _as_float(t)
    if t <= 0:
        return v.clone()
    a = v.abs().double()
    theta = _box_theta(a, a.new_tensor(t), k)
    return (v.double() * (theta / (theta + t))).to(v.dtype)


def _group_weights(d, m: int, like: torch.Tensor):
    """Group weights d_j > 0 as a float64 (m,) tensor, or None for the default d_j = 1."""
    if d is None:
        return None
    d = torch.as_tensor(d, dtype=torch.float64, device=like.device)
    d = d.expand(m) if d.numel() == 1 else d.reshape(m)
    if not bool((d > 0).all()):
        raise ValueError("wgsef: group weights d must be > 0")
    return d


def wgsef(x: torch.Tensor, k: int, d=None) -> torch.Tensor:
    """Weighted group sparse envelope WGSEF_k(x) = SEF_k(u), u_j = √d_j·‖x_{G_j}‖,
    groups = rows of 2-D ``x``, group weights d_j (default 1)."""
    _check_rows(x, "wgsef")
    if k < 1:
        raise ValueError(f"wgsef: k must be >= 1 (got {k})")
    u = torch.linalg.vector_norm(x, dim=1).double()
    dw = _group_weights(d, x.shape[0], x)
    if dw is not None:
        u = u * dw.sqrt()
    return _sef_of_magnitudes(u, k).to(x.dtype)


def prox_wgsef(v: torch.Tensor, k: int, t, d=None, exact_k: bool = False) -> torch.Tensor:
    """Prox of t·WGSEF_k, groups = rows of 2-D ``v``, group weights d_j (default 1).

    a_j = ‖v_{G_j}‖, c_j = √d_j·a_j, b_j = t·d_j. If at most k groups are non-zero,
    θ_j = 1; else solve Σ_j clip(α·c_j − b_j, 0, 1) = k for α (sorted breakpoints,
    float64, O(m log m)) and θ_j = clip(α·c_j − b_j, 0, 1). Then
        x_{G_j} = v_{G_j}·θ_j / (θ_j + t·d_j).
    ``exact_k=True`` finishes with a hard top-k on the groups (by √d_j‖x_{G_j}‖), for
    "exactly k groups" when the k-th norm does not dominate the (k+1)-th.
    """
    _check_rows(v, "prox_wgsef")
    if k < 1:
        raise ValueError(f"prox_wgsef: k must be >= 1 (got {k})")
    t = _as_float(t)
    m = v.shape[0]
    dw = _group_weights(d, m, v)
    a = torch.linalg.vector_norm(v, dim=1).double()
    c = a if dw is None else dw.sqrt() * a
    if t > 0:
        b = a.new_tensor(t) if dw is None else t * dw
        theta = _box_theta(c, b, k)
        scale = theta / (theta + b)
    else:
        scale = torch.ones_like(a)
    if exact_k and k < m:
        keep = torch.zeros_like(scale, dtype=torch.bool)
        keep[torch.topk(c * scale, k).indices] = True
        scale = torch.where(keep, scale, torch.zeros_like(scale))
    return v * scale.to(v.dtype).unsqueeze(1)


# ---------------------------------------------------------------------------- gradients


QUANTILE_MAX_NUMEL = 1 << 24  # torch.quantile refuses larger inputs


def clip_outliers(g: torch.Tensor, q: float = 0.9, sample_size: int | None = None) -> torch.Tensor:
    """Clip to ±τ with τ = the q-quantile of |g| (ROOT's robust step).

    τ is ``torch.quantile(|g|, q)`` (linear interpolation between the order statistics
    around q·(n − 1)). For tensors ``torch.quantile`` refuses (over 2²⁴ entries) the
    same value is found by selection (two ``kthvalue`` calls), with no size limit.
    With ``sample_size`` set and n larger, τ is estimated from an evenly strided sample
    of about that many entries (cheaper for very large tensors; approximate).
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"clip_outliers: q must be in (0, 1] (got {q})")
    flat = g.reshape(-1)
    if sample_size is not None and flat.numel() > sample_size:
        flat = flat[:: flat.numel() // sample_size]
    n = flat.numel()
    if n == 0:
        return g.clone()
    mags = flat.abs() if flat.dtype in (torch.float32, torch.float64) else flat.abs().float()
    if n <= QUANTILE_MAX_NUMEL:
        tau = torch.quantile(mags, q)
    else:
        rank = q * (n - 1)
        below, above = math.floor(rank), math.ceil(rank)
        lo = mags.kthvalue(below + 1).values
        hi = mags.kthvalue(above + 1).values if above != below else lo
        tau = torch.lerp(lo, hi, torch.tensor(rank - below, dtype=mags.dtype, device=mags.device))
    tau = tau.to(g.dtype)
    return g.clamp(-tau, tau)
