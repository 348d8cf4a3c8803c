"""Regularizers: parameter-side (penalty + prox) and loss-side (KL, entropy).

A parameter regularizer R with coefficient λ (``lam``, settable so schedules can update
it) exposes

    penalty(param) -> λ·R(param)                       (a differentiable scalar tensor)
    prox(param, step)  param ← prox_{step·λ·R}(param)  (in place, also returned)
    sparsity(param) -> fraction of zero groups (group types) or entries (elementwise)

``step`` is the gradient step size η (the learning rate of the param's group); the
operator applied is the prox of η·λ·R, exactly the proximal-gradient step
x ← prox_{ηλR}(x − η∇f(x)). Group types view a parameter as
``param.view(param.shape[0], -1)``: one group per row (output neuron / channel).

``elementwise`` types (l1, l0, elastic_net) act on each entry alone, so their prox runs
on a parameter's local shard under FSDP (``run.grad_sync: fsdp``); the others need the
whole parameter and are refused there.

Types are registered by name in ``REGULARIZERS`` (an ``rlprox.registry.Registry``);
``build_regularizer`` builds one from a recipe entry such as
``{"type": "wgsef", "k": 16, "lam": 1e-3}``; a custom type is given as ``"module:Class"``.
Structural sizes (``k`` of ``wgsef`` and ``topk``) are required: there is no sensible
default.
"""

from __future__ import annotations

import abc

import torch

from rlprox.errors import RegistryError
from rlprox.objectives import gaussian_mean_kl, kl_k3
from rlprox.prox import operators as ops
from rlprox.registry import Registry

__all__ = [
    "Regularizer",
    "LossRegularizer",
    "Brownian",
    "brownian_residual",
    "PriorCE",
    "KLReference",
    "L1",
    "GroupL2",
    "L0",
    "TopK",
    "ElasticNet",
    "Nuclear",
    "WGSEF",
    "REGULARIZERS",
    "register_regularizer",
    "build_regularizer",
]

REGULARIZERS = Registry("regularizer type")


def register_regularizer(name: str):
    """Class decorator: make a Regularizer buildable as ``{"type": name, ...}``."""
    return REGULARIZERS.register(name)


def local_tensor(x: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (an FSDP-sharded parameter), else ``x``."""
    to_local = getattr(x, "to_local", None)
    return to_local() if to_local is not None else x


def full_tensor(x: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: every process must call it), else ``x``."""
    full = getattr(x, "full_tensor", None)
    return full() if full is not None else x


def _rows(param: torch.Tensor) -> torch.Tensor:
    return param.view(param.shape[0], -1) if param.dim() > 0 else param.view(1, 1)


class Regularizer(abc.ABC):
    """Base class. Subclasses implement ``value(x)`` (R without λ) and
    ``_prox(x, t)`` (prox of t·R on the raw tensor); ``grouped`` selects the row view;
    ``elementwise`` says the prox acts on each entry alone (it may run on a shard)."""

    grouped = False
    elementwise = False

    def __init__(self, lam: float = 0.0):
        if lam < 0:
            raise ValueError(f"regularizer field 'lam' must be >= 0 (got {lam})")
        self.lam = float(lam)

    def _view(self, param: torch.Tensor) -> torch.Tensor:
        return _rows(param) if self.grouped else param

    @abc.abstractmethod
    def value(self, x: torch.Tensor) -> torch.Tensor:
        """R(x) without λ, on the (row-grouped) view."""

    @abc.abstractmethod
    def _prox(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """prox of t·R on the (row-grouped) view."""

    def penalty(self, param: torch.Tensor) -> torch.Tensor:
        """λ·R(param)."""
        return self.lam * self.value(self._view(param))

    @torch.no_grad()
    def prox(self, param: torch.Tensor, step: float) -> torch.Tensor:
        """param ← prox_{step·λ·R}(param), in place on ``param.data``; returns param.
        On an FSDP-sharded parameter it runs on the local shard (elementwise types only)."""
        data = local_tensor(param.data)
        out = self._prox(self._view(data), float(step) * self.lam)
        data.copy_(out.view_as(data))
        return param

    @torch.no_grad()
    def sparsity(self, param: torch.Tensor) -> float:
        """Fraction of all-zero groups (rows) for group types, of zero entries otherwise."""
        x = self._view(full_tensor(param.detach()))
        if self.grouped:
            return float((x != 0).sum(1).eq(0).float().mean())
        return float(x.eq(0).float().mean())

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


@register_regularizer("l1")
class L1(Regularizer):
    """R(x) = ‖x‖₁; prox is the soft threshold at ηλ."""

    elementwise = True

    def value(self, x):
        return x.abs().sum()

    def _prox(self, x, t):
        return ops.prox_l1(x, t)


@register_regularizer("group_l2")
class GroupL2(Regularizer):
    """R(x) = Σ_j w_j‖x_{G_j}‖₂ over rows (group lasso); w_j = √|G_j| by default."""

    grouped = True

    def __init__(self, lam: float = 0.0, weights=None):
        super().__init__(lam)
        if weights is not None:
            try:
                weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(
                    f"regularizer 'group_l2': field 'weights' must be a number or a list of numbers (got {weights!r})"
                ) from None
            if (weights < 0).any():
                raise ValueError("regularizer 'group_l2': field 'weights' must be >= 0")
        self.weights = weights

    def _w(self, x):
        if self.weights is None:
            return x.shape[1] ** 0.5
        if self.weights.numel() not in (1, x.shape[0]):
            raise ValueError(f"regularizer 'group_l2': {self.weights.numel()} weights for {x.shape[0]} groups")
        return self.weights.to(device=x.device, dtype=x.dtype)

    def value(self, x):
        w = self._w(x)
        if isinstance(w, torch.Tensor):
            w = w.to(x)
        return (torch.linalg.vector_norm(x, dim=1) * w).sum()

    def _prox(self, x, t):
        return ops.prox_group_l2(x, t, self._w(x))


@register_regularizer("l0")
class L0(Regularizer):
    """R(x) = ‖x‖₀; prox is the hard threshold at √(2ηλ). Penalty is not differentiable."""

    elementwise = True

    def value(self, x):
        return (x != 0).sum().to(x.dtype)

    def _prox(self, x, t):
        return ops.prox_l0(x, t)


@register_regularizer("topk")
class TopK(Regularizer):
    """Constraint ‖x‖₀ ≤ k on the whole (flattened) parameter: prox = projection
    (keep the k largest |x_i|; ``absolute=False`` keeps the k largest values then ReLU).
    λ is unused; the penalty is 0."""

    def __init__(self, k: int, lam: float = 0.0, absolute: bool = True):
        super().__init__(lam)
        if int(k) < 1:
            raise ValueError(f"regularizer field 'k' must be >= 1 (got {k})")
        self.k = int(k)
        self.absolute = bool(absolute)

    def value(self, x):
        return x.new_zeros(())

    def penalty(self, param):
        return param.new_zeros(())

    def _prox(self, x, t):
        flat = x.reshape(-1)
        proj = ops.project_abs_topk if self.absolute else ops.project_topk
        return proj(flat, self.k).view_as(x)


@register_regularizer("elastic_net")
class ElasticNet(Regularizer):
    """R(x) = ρ‖x‖₁ + ((1−ρ)/2)‖x‖², ρ = ``l1_ratio`` (scikit-learn's convention)."""

    elementwise = True

    def __init__(self, lam: float = 0.0, l1_ratio: float = 0.5):
        super().__init__(lam)
        if not 0.0 <= l1_ratio <= 1.0:
            raise ValueError(f"regularizer field 'l1_ratio' must be in [0, 1] (got {l1_ratio})")
        self.l1_ratio = float(l1_ratio)

    def value(self, x):
        return self.l1_ratio * x.abs().sum() + 0.5 * (1 - self.l1_ratio) * (x * x).sum()

    def _prox(self, x, t):
        return ops.prox_elastic_net(x, t * self.l1_ratio, t * (1 - self.l1_ratio))


@register_regularizer("nuclear")
class Nuclear(Regularizer):
    """R(X) = ‖X‖_* (sum of singular values) of the row view; prox = singular value
    thresholding. ``sparsity`` is the fraction of zero singular values (1 − rank/min(m,n))."""

    grouped = True

    def value(self, x):
        return torch.linalg.svdvals(x).sum()

    def _prox(self, x, t):
        return ops.prox_nuclear(x, t)

    @torch.no_grad()
    def sparsity(self, param):
        s = torch.linalg.svdvals(_rows(param.detach()))
        tol = s.max() * max(s.shape) * torch.finfo(s.dtype).eps if s.numel() else 0
        return float((s <= tol).float().mean())


@register_regularizer("wgsef")
class WGSEF(Regularizer):
    """R(x) = WGSEF_k(x) = SEF_k(u), u_j = √d_j·‖x_{G_j}‖ over rows; ``exact_k`` finishes
    each prox with a hard top-k on the groups."""

    grouped = True

    def __init__(self, k: int, lam: float = 0.0, d=None, exact_k: bool = False):
        super().__init__(lam)
        if int(k) < 1:
            raise ValueError(f"regularizer field 'k' must be >= 1 (got {k})")
        self.k = int(k)
        self.d = d
        self.exact_k = bool(exact_k)

    def value(self, x):
        # differentiable form: SEF of the weighted norms (the sort is piecewise smooth)
        d = ops._group_weights(self.d, x.shape[0], x)
        u = torch.linalg.vector_norm(x, dim=1)
        if d is not None:
            u = u * d.to(x.dtype).sqrt()
        return ops._sef_of_magnitudes(u, self.k)

    def _prox(self, x, t):
        return ops.prox_wgsef(x, self.k, t, d=self.d, exact_k=self.exact_k)


class LossRegularizer(abc.ABC):
    """A regularizer on quantities a trainer computes in its loss (velocities, logits,
    log-probs), not on parameters: ``penalty(**tensors) = λ·value(**tensors)`` is added
    to the loss. ``inputs`` names the tensors it needs; a trainer provides them through
    the ``loss_terms(**tensors)`` its build receives. In a recipe it is an entry like any other,
    without ``params``: ``regularizers: [{type: brownian, lam: 0.1}]``."""

    inputs: tuple[str, ...] = ()
    # other sets of tensors that also define the term, tried in order (``inputs`` first);
    # a trainer must offer one whole set
    alternative_inputs: tuple[tuple[str, ...], ...] = ()

    def __init__(self, lam: float = 0.0):
        if lam < 0:
            raise ValueError(f"regularizer field 'lam' must be >= 0 (got {lam})")
        self.lam = float(lam)

    @abc.abstractmethod
    def value(self, **tensors) -> torch.Tensor:
        """The term without λ (a scalar tensor)."""

    def input_sets(self) -> tuple[tuple[str, ...], ...]:
        """Every set of tensor names the term can be computed from, preferred first."""
        return (self.inputs, *self.alternative_inputs)

    def usable_inputs(self, offered) -> tuple[str, ...] | None:
        """The first input set that ``offered`` (names) covers; None when none is."""
        return next((names for names in self.input_sets() if all(k in offered for k in names)), None)

    def penalty(self, **tensors) -> torch.Tensor:
        names = self.usable_inputs(tensors)
        if names is None:
            wanted = " or ".join("(" + ", ".join(names) + ")" for names in self.input_sets())
            raise ValueError(f"{type(self).__name__} needs {wanted}; the loss gave ({', '.join(tensors)})")
        return self.lam * self.value(**{k: tensors[k] for k in names})


def brownian_residual(
    v: torch.Tensor, v_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, base_std: float = 1.0
) -> torch.Tensor:
    """PolicyFlow's Brownian residual (noise at t = 0, action at t = 1, base noise
    z ~ N(0, s²·I) with s = ``base_std``):

        η_t = (1 − t)·v_θ(x_t, t, s) − (x_t − t·v̂(x_t, t, s)) / s²  =  (1 − t)·(v_θ + ∇log p_t(x_t))

    from the score identity of the straight path x_t = (1 − t)·z + t·a,
    ∇log p_t(x) = (t·v̂ − x) / ((1 − t)·s²); the paper's form is s = 1.
    ``v`` is the current velocity v_θ (gradients flow), ``v_hat`` the velocity frozen at
    the rollout parameters (stop-gradient: no gradient reaches it), ``x_t`` the point on
    the straight path, ``t`` (B,) or (B, 1). Shapes (B, A) -> (B, A).
    """
    t = t.reshape(-1, *([1] * (x_t.ndim - 1))) if t.ndim else t
    return (1.0 - t) * v - (x_t - t * v_hat.detach()) / base_std**2


@register_regularizer("brownian")
class Brownian(LossRegularizer):
    """w_b·‖η_t‖², the Brownian regularizer of PolicyFlow (an implicit entropy bonus against
    mode collapse): λ is w_b. ``reduction``:

    - ``mean``: the mean of η² over the batch **and** the action dimensions, as the released
      implementation computes it (``F.mse_loss``), where w_b = 0.25 was tuned;
    - ``sum``: the sum over the A action dimensions, then the mean over the batch, the paper's
      written squared norm: the same w_b is A times stronger than under ``mean``.

    PolicyFlow offers its base noise std; a trainer that offers only (v, v_hat, x_t, t) gets s = 1."""

    inputs = ("v", "v_hat", "x_t", "t", "base_std")
    alternative_inputs = (("v", "v_hat", "x_t", "t"),)

    def __init__(self, lam: float = 0.0, reduction: str = "mean"):
        super().__init__(lam)
        if reduction not in ("mean", "sum"):
            raise ValueError(f"regularizer field 'reduction' must be mean or sum (got {reduction!r})")
        self.reduction = reduction

    def value(self, v, v_hat, x_t, t, base_std=1.0):
        squared = brownian_residual(v, v_hat, x_t, t, base_std).pow(2)  # (B, A)
        return squared.mean() if self.reduction == "mean" else squared.sum(-1).mean()


@register_regularizer("prior_ce")
class PriorCE(LossRegularizer):
    """β·CE(logits, z*): the ELBO's prior term of VA-π, the generator's own next-token
    cross-entropy on the ground-truth tokens (LlamaGen's training loss); λ is β.
    logits (B, T, V), targets (B, T)."""

    inputs = ("logits", "targets")

    def value(self, logits, targets):
        return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


@register_regularizer("kl_ref")
class KLReference(LossRegularizer):
    """λ·KL(π_θ ‖ π_ref), the KL to the reference (pre-fine-tuning) policy, from what the
    trainer's loss offers:

    - Gaussian steps (LOOP's denoising steps: the flow SDE / CPS step, DDIM(η)): the step
      means μ, μ_ref. ``scale: exact`` (the default) divides by the step's own std,
      mean (μ − μ_ref)²/(2·std²) over latent elements and samples: the exact KL of the two
      Gaussians (``objectives.gaussian_mean_kl``). ``scale: flow_grpo`` divides by
      Flow-GRPO's ``std_dev_t`` instead, which lacks the SDE step's √(−dt): its training
      script's formula, so a β from its configs means the same (flow-matching steps only;
      exact = flow_grpo / (−dt), ≈ T× with T uniform steps; on CPS steps both agree);
    - sampled tokens (VA-π): log π_θ and log π_ref of the samples, Schulman's k3 estimator
      (``objectives.kl_k3``; ``scale: exact`` only).

    The reference is never trained (its tensors are detached). The trainer computes them
    only when this is in the recipe: a LoRA model with its adapters off, else a frozen copy."""

    inputs = ("mean", "ref_mean", "std")
    alternative_inputs = (("logp", "ref_logp"),)
    SCALES = ("exact", "flow_grpo")

    def __init__(self, lam: float = 0.0, scale: str = "exact"):
        super().__init__(lam)
        if scale not in self.SCALES:
            raise ValueError(f"regularizer field 'scale' must be exact or flow_grpo (got {scale!r})")
        self.scale = scale

    def input_sets(self) -> tuple[tuple[str, ...], ...]:
        if self.scale == "flow_grpo":
            return (("mean", "ref_mean", "flow_grpo_std"),)
        return super().input_sets()

    def value(self, mean=None, ref_mean=None, std=None, logp=None, ref_logp=None, flow_grpo_std=None):
        if flow_grpo_std is not None:
            return gaussian_mean_kl(mean, ref_mean.detach(), flow_grpo_std)
        if mean is not None:
            return gaussian_mean_kl(mean, ref_mean.detach(), std)
        return kl_k3(logp, ref_logp.detach())


def build_regularizer(spec: dict):
    """Build a regularizer from ``{"type": name_or_module:Class, "lam": ..., **kwargs}``.

    A ``params`` key (the engine's parameter selector) is ignored here. Raises
    ``ValueError`` with a one-line message naming the bad field.
    """
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError("regularizer field 'type' is missing")
    name = spec["type"]
    if not isinstance(name, str):
        raise ValueError(f"regularizer field 'type' must be a string (got {name!r})")
    kwargs = {k: v for k, v in spec.items() if k not in ("type", "params")}
    try:
        cls = REGULARIZERS.get(name)
    except RegistryError as err:
        raise ValueError(f"regularizer field 'type': {err}") from None
    is_loss = isinstance(cls, type) and issubclass(cls, LossRegularizer)
    if (
        ":" in name
        and not is_loss
        and not (callable(getattr(cls, "penalty", None)) and callable(getattr(cls, "prox", None)))
    ):
        raise ValueError(
            f"regularizer field 'type': {name!r} has no penalty()/prox() methods (nor is it a LossRegularizer)"
        )
    try:
        return REGULARIZERS.build(name, kwargs)
    except RegistryError as err:
        raise ValueError(str(err)) from None


# ------------------------------------------------------------------ loss-side regularizers
