"""ProxOptimizer: proximal-gradient steps on top of any torch optimizer.

    x ← prox_{η·λ·R}(base_step(x))      for every regularized parameter

λ is the regularizer's coefficient (``reg.lam``, which coefficient schedules update) and
η the prox step: by default the current learning rate of the parameter's param group
(so LR schedules drive the prox step too) — exactly proximal gradient descent when the
base is plain SGD. Under an adaptive optimizer (Adam) the lr is not a gradient step size
(its per-parameter steps are ≈ lr·sign-like, and a cosine schedule drives it to 0), so a
regularizer may carry its own step instead: ``add_regularizer(params, reg, step=f)``
with ``f()`` the current η (``prox_lr`` in recipes, a constant or a schedule).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

__all__ = ["ProxOptimizer"]


class ProxOptimizer(torch.optim.Optimizer):
    """Wrap ``base`` so that each ``step()`` is ``base.step()`` followed by the prox.

    Args:
        base: any ``torch.optim.Optimizer``. Its ``param_groups``, ``state`` and
            ``defaults`` are *shared* (same objects), so LR schedulers built on the
            ProxOptimizer, ``add_param_group`` and accelerate's ``AcceleratedOptimizer``
            wrapping it all see and change the base's settings.
            ``state_dict()`` / ``load_state_dict()`` delegate to the base.
        regularizers: ``[(params, regularizer), ...]``; each regularizer's
            ``prox(param, step=η)`` is applied, with η the lr of the group holding the
            param, after every base step. Regularizers are deliberately kept out of the
            param groups so that optimizer state dicts stay plain tensors and numbers.
        fista: Beck–Teboulle acceleration for *full-batch* problems; needs a plain SGD
            base (no momentum, no weight decay) with lr = 1/L. The parameters then hold
            the extrapolated point y_{k+1} = x_{k+1} + (t_k − 1)/t_{k+1}·(x_{k+1} − x_k),
            t_{k+1} = (1 + √(1 + 4t_k²))/2, at which the next gradient is taken; the
            proximal iterate x_k is in ``state[p]["fista_x"]``; call
            ``use_iterates()`` to copy it back into the parameters when done.
        restart: with ``fista``, the gradient-mapping adaptive restart
            (O'Donoghue & Candès): momentum is reset (t ← 1) whenever
            ⟨y_k − x_{k+1}, x_{k+1} − x_k⟩ > 0. Keeps FISTA monotone-ish and linear on
            strongly convex (e.g. Lasso on its support) problems.

    Under accelerate gradient accumulation, ``AcceleratedOptimizer`` only calls our
    ``step()`` on real sync steps, so the prox runs only on real optimizer steps (not
    once per micro-batch).
    """

    def __init__(self, base: torch.optim.Optimizer, regularizers=None, fista: bool = False, restart: bool = True):
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"ProxOptimizer: base must be a torch Optimizer (got {type(base).__name__})")
        if fista:
            ok = isinstance(base, torch.optim.SGD) and all(
                g.get("momentum", 0) == 0 and g.get("weight_decay", 0) == 0 for g in base.param_groups
            )
            if not ok:
                raise ValueError("ProxOptimizer: fista=True needs a plain SGD base (momentum=0, weight_decay=0)")
        # Optimizer.__init__ would build new param groups; set up the hook machinery
        # ourselves and share the base's containers instead.
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        self.base = base
        self.fista = bool(fista)
        self.restart = bool(restart)
        self.regularizers: list[tuple[list[torch.Tensor], object, object]] = []
        for entry in regularizers or []:
            self.add_regularizer(*entry)

    # shared containers: always the base's, even if the base rebinds them
    @property
    def param_groups(self):
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.base.param_groups = value

    @property
    def state(self):
        return self.base.state

    @state.setter
    def state(self, value):
        self.base.state = value

    @property
    def defaults(self):
        return self.base.defaults

    @defaults.setter
    def defaults(self, value):
        self.base.defaults = value

    def add_regularizer(self, params, regularizer, step=None) -> None:
        """Apply ``regularizer`` to ``params`` (a tensor or an iterable of tensors), with
        prox step ``step()`` if given (a callable returning the current η), else the
        params' group lr."""
        if isinstance(params, torch.Tensor):
            params = [params]
        params = list(params)
        known = {id(p) for g in self.param_groups for p in g["params"]}
        for p in params:
            if id(p) not in known:
                raise ValueError("ProxOptimizer: a regularized parameter is not in the base optimizer's param groups")
        self.regularizers.append((params, regularizer, step))

    def add_param_group(self, param_group: dict) -> None:
        self.base.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.base.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.base.load_state_dict(state_dict)

    def __repr__(self) -> str:
        regs = ", ".join(repr(r) for _, r, _ in self.regularizers)
        return f"ProxOptimizer(fista={self.fista}, regularizers=[{regs}],\n{self.base!r})"

    def _lr_of(self) -> dict[int, float]:
        return {id(p): float(g["lr"]) for g in self.param_groups for p in g["params"]}

    @torch.no_grad()
    def apply_prox(self) -> None:
        """x ← prox_{η·λ·R}(x) for every regularized parameter (η = the regularizer's own
        step if it has one, else its group's lr)."""
        lr = self._lr_of()
        for params, reg, step in self.regularizers:
            eta = step() if step is not None else None
            for p in params:
                reg.prox(p, lr[id(p)] if eta is None else eta)

    def step(self, closure=None):
        """``base.step(closure)``, then the prox (then the FISTA extrapolation)."""
        if self.fista:
            y_prev = {p: p.detach().clone() for g in self.param_groups for p in g["params"]}
        loss = self.base.step(closure) if closure is not None else self.base.step()
        self.apply_prox()
        if self.fista:
            self._extrapolate(y_prev)
        return loss

    @torch.no_grad()
    def _extrapolate(self, y_prev) -> None:
        params = list(y_prev)
        first = params[0]
        st0 = self.state[first]
        t_k = float(st0.get("fista_t", 1.0))
        x_prev = [self.state[p].get("fista_x", y_prev[p]) for p in params]
        if self.restart:
            # ⟨y_k − x_{k+1}, x_{k+1} − x_k⟩ > 0  →  the momentum points uphill
            inner = sum(float(((y_prev[p] - p) * (p - xp)).sum()) for p, xp in zip(params, x_prev))
            if inner > 0:
                t_k = 1.0
        t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t_k * t_k))
        beta = (t_k - 1.0) / t_next
        for p, xp in zip(params, x_prev):
            x_new = p.detach().clone()
            if beta != 0.0:
                p.add_(x_new - xp, alpha=beta)
            self.state[p]["fista_x"] = x_new
        st0["fista_t"] = t_next

    @torch.no_grad()
    def use_iterates(self) -> None:
        """FISTA: copy the proximal iterates x_k into the parameters and reset momentum."""
        for g in self.param_groups:
            for p in g["params"]:
                st = self.state[p]
                if "fista_x" in st:
                    p.copy_(st["fista_x"])
                st.pop("fista_t", None)
