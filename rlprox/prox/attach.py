"""Recipe ``regularizers:`` -> regularizers attached to named parameters.

Each entry selects parameters by a glob over "<module>.<parameter>" names (e.g.
``policy.actor.[02].weight``) and says how the regularizer acts:

    regularizers:
      - {type: wgsef, params: "policy.actor.[02].weight", k: 16, lam: 1.0e-3}
      - {type: l1, params: "policy.critic.*.weight", lam: 1.0e-4, mode: penalty}
      - {type: group_l2, params: "policy.actor.0.weight",
         lam_schedule: {type: linear, start: 0.0, end: 1.0e-3, steps: 100}}

mode "prox" (default): param ← prox_{η·λ·R}(param) after every real optimizer step
(ProxOptimizer; η = the param group's current lr, or the entry's own ``prox_lr``: a
number or a schedule over iterations — use it with Adam/AdamW, whose lr is no gradient
step size; with ``optim.name: sgd`` leave it out and the step is proximal SGD's own). mode "penalty": λ·R(param) is
added to the loss instead. Loss-side regularizers (``LossRegularizer``: the Brownian
term, KL to a reference, a prior cross-entropy) take no ``params``: they act on tensors
the trainer computes: the engine builds them as ``LossTerms`` before the trainer and hands
them to its build, and the trainer's loss adds ``loss_terms(**tensors)``.
``lam_schedule`` gives λ per iteration (then omit ``lam``; ``schedule`` is its
deprecated name). This is the one place where every trainer gets its regularizers from.
"""

from __future__ import annotations

import fnmatch

import torch

from rlprox.errors import RecipeError, move_renamed
from rlprox.prox.optim import ProxOptimizer
from rlprox.prox.regularizers import LossRegularizer, build_regularizer, full_tensor
from rlprox.prox.schedules import build_schedule

# the keys of an entry the engine reads (the others are the regularizer's own: type, lam, k, ...), and their docs
# (`rlprox train --help-recipe regularizers`)
ENTRY_KEYS = {
    "type": "the regularizer: a registered name (l1, group_l2, wgsef, kl_ref, ...) or 'module:Class'",
    "params": "glob over '<module>.<parameter>' names of the parameters it acts on (loss-side types: none)",
    "mode": "prox (default): a proximal step after each optimizer step; penalty: λ·R(params) added to the loss; "
    "loss: a loss-side regularizer (KL, entropy), added by the trainer",
    "lam": "the coefficient λ (constant; or give lam_schedule)",
    "lam_schedule": "λ per iteration: {type: constant|linear|cosine|piecewise_sine, ...} (then omit lam)",
    "prox_lr": "prox mode: the prox step η, a number or a schedule over iterations (default: the param group's lr)",
}
ENGINE_KEYS = ("params", "mode", "lam_schedule", "prox_lr")
RENAMED = {"schedule": "lam_schedule"}  # old entry key -> new (the old one goes in the next release)


def upgrade_entry(spec: dict, index: int) -> dict:
    """The entry with deprecated keys renamed (one stderr line each); both names given: RecipeError."""
    return move_renamed(spec, RENAMED, f"regularizers[{index}]")


def _numbers(spec: dict) -> dict:
    """PyYAML reads ``1e-3`` as a string; read number-like strings as floats."""
    out = {}
    for k, v in spec.items():
        if isinstance(v, dict):
            v = _numbers(v)
        elif isinstance(v, str) and k not in ("type", "params", "mode"):
            try:
                v = float(v)
            except ValueError:
                pass
        out[k] = v
    return out


def parse_spec(spec: dict, index: int):
    """Build (regularizer, schedule, mode) from one recipe entry; RecipeError on bad input."""
    key = f"regularizers[{index}]"
    if not isinstance(spec, dict) or "type" not in spec:
        raise RecipeError(key, "expected a mapping with a 'type' key")
    spec = _numbers(upgrade_entry(spec, index))
    try:
        reg = build_regularizer({k: v for k, v in spec.items() if k not in ENGINE_KEYS})
    except (ValueError, TypeError) as err:
        raise RecipeError(key, str(err)) from None
    if isinstance(reg, LossRegularizer):
        if "params" in spec:
            raise RecipeError(
                f"{key}.params",
                f"{spec['type']} acts on what the trainer computes "
                f"({', '.join(reg.inputs)}), not on parameters; remove params",
            )
        mode = spec.get("mode", "loss")
        if mode != "loss":
            raise RecipeError(
                f"{key}.mode", f"{spec['type']} is a loss-side regularizer: mode must be loss (got {mode!r})"
            )
    else:
        if not isinstance(spec.get("params"), str) or not spec["params"]:
            raise RecipeError(
                f"{key}.params", "a glob over '<module>.<parameter>' names is required, e.g. 'policy.actor.*.weight'"
            )
        mode = spec.get("mode", "prox")
        if mode not in ("prox", "penalty"):
            raise RecipeError(f"{key}.mode", f"must be prox or penalty (got {mode!r})")
    schedule = None
    if "lam_schedule" in spec:
        if "lam" in spec:
            raise RecipeError(f"{key}.lam", "give either lam or lam_schedule (the schedule sets λ), not both")
        try:
            schedule = build_schedule(spec["lam_schedule"])
            schedule(0)
        except (ValueError, TypeError) as err:
            raise RecipeError(f"{key}.lam_schedule", str(err)) from None
    if schedule is not None:
        reg.lam = float(schedule(0))
    if "prox_lr" in spec:
        if mode != "prox":
            raise RecipeError(f"{key}.prox_lr", f"only a prox-mode regularizer has a prox step (mode is {mode})")
        try:
            prox_lr = build_schedule(spec["prox_lr"])
            first = float(prox_lr(0))
        except (ValueError, TypeError) as err:
            raise RecipeError(f"{key}.prox_lr", str(err)) from None
        if first < 0:
            raise RecipeError(f"{key}.prox_lr", f"must be >= 0 (got {first})")
        reg.prox_lr = prox_lr
    return reg, schedule, mode


class AttachedRegularizer:
    """One recipe entry bound to its parameters."""

    def __init__(self, index: int, spec: dict, reg, schedule, mode: str, named: dict[str, torch.nn.Parameter]):
        self.index, self.spec, self.reg, self.schedule, self.mode = index, spec, reg, schedule, mode
        self.named = named
        self.label = f"{index}.{spec['type']}"
        self.prox_lr_schedule = getattr(reg, "prox_lr", None)
        self.prox_lr = float(self.prox_lr_schedule(0)) if self.prox_lr_schedule is not None else None

    def set_iteration(self, iteration: int) -> None:
        if self.schedule is not None:
            self.reg.lam = float(self.schedule(iteration))
        if self.prox_lr_schedule is not None:
            self.prox_lr = float(self.prox_lr_schedule(iteration))

    def prox_step(self) -> float:
        """The configured prox step η (``prox_lr`` at the current iteration)."""
        return self.prox_lr

    def parameter_penalty(self) -> torch.Tensor | None:
        """λ·Σ R(param) over this entry's parameters, which the engine adds to the loss
        (``mode: penalty``); None in the other modes."""
        if self.mode != "penalty":
            return None
        return sum(self.reg.penalty(p) for p in self.named.values())

    @torch.no_grad()
    def stats(self) -> dict[str, float]:
        if self.mode == "loss":
            return {f"penalty/{self.label}.lam": self.reg.lam}
        whole = {name: full_tensor(p.detach()) for name, p in self.named.items()}  # FSDP shards gathered
        out = {f"sparsity/{name}": float(self.reg.sparsity(p)) for name, p in whole.items()}
        penalty = sum(float(self.reg.penalty(p)) for p in whole.values())
        out[f"penalty/{self.label}"] = penalty
        out[f"penalty/{self.label}.lam"] = self.reg.lam
        if self.prox_lr is not None:
            out[f"penalty/{self.label}.prox_lr"] = self.prox_lr
        return out


class LossTerms:
    """The recipe's loss-side regularizers (mode "loss"), which act on tensors a trainer's loss
    computes (e.g. PolicyFlow's velocities, LOOP's step means): built by the engine before the
    trainer and handed to its build. ``terms(**tensors)`` is Σ λ·R(tensors) with each value as a
    ``penalty/<index>.<type>`` stat; the trainer passes every tensor it offers (its
    ``TrainerSpec.loss_inputs``) and computes an optional one only when ``needs`` says so."""

    def __init__(self, entries: list[AttachedRegularizer] = ()):
        self.entries = list(entries)

    @classmethod
    def from_specs(cls, specs: list[dict]) -> "LossTerms":
        entries = []
        for i, spec in enumerate(specs):
            reg, schedule, mode = parse_spec(spec, i)
            if mode == "loss":
                entries.append(AttachedRegularizer(i, _numbers(spec), reg, schedule, mode, {}))
        return cls(entries)

    def needs(self, name: str) -> bool:
        """Whether a term with a non-zero λ (now or by its schedule) reads the tensor ``name``."""
        return any(
            (e.schedule is not None or e.reg.lam > 0) and any(name in names for names in e.reg.input_sets())
            for e in self.entries
        )

    def __call__(self, **tensors) -> tuple[torch.Tensor | float, dict]:
        total, stats = 0.0, {}
        for entry in self.entries:
            value = entry.reg.penalty(**tensors)
            total = total + value
            stats[f"penalty/{entry.label}"] = value.detach()
        return total, stats


def attach_regularizers(
    optimizer: torch.optim.Optimizer,
    named_params: dict[str, torch.nn.Parameter],
    specs: list[dict],
    frozen_names: list[str] = (),
    sharded: bool = False,
):
    """Wrap ``optimizer`` in a ProxOptimizer carrying the recipe's prox-mode
    regularizers; return (optimizer, [AttachedRegularizer]) of the parameter-side entries
    (the loss-side ones are ``LossTerms``'). ``named_params`` are the trainable parameters;
    a glob that matches any of ``frozen_names`` is an error (regularizers act on trained
    parameters only). ``sharded``: the parameters are FSDP shards, so only elementwise
    prox-mode regularizers can act on them."""
    attached = []
    prox_pairs = []
    claimed: dict[str, int] = {}
    for i, spec in enumerate(specs):
        reg, schedule, mode = parse_spec(spec, i)
        spec = _numbers(spec)
        if mode == "loss":
            continue
        if sharded and mode == "penalty":
            raise RecipeError(
                f"regularizers[{i}].mode",
                f"{spec['type']} in mode penalty is not supported on "
                "FSDP-sharded parameters (run.grad_sync: fsdp); use mode: prox",
            )
        if sharded and not getattr(reg, "elementwise", False):
            raise RecipeError(
                f"regularizers[{i}].type",
                f"{spec['type']} needs whole parameters (groups, top-k or SVD) and cannot act on "
                "FSDP shards (run.grad_sync: fsdp); use l1, l0 or elastic_net, or run.grad_sync: ddp",
            )
        names = [n for n in named_params if fnmatch.fnmatchcase(n, spec["params"])]
        frozen = [n for n in frozen_names if fnmatch.fnmatchcase(n, spec["params"])]
        if frozen:
            raise RecipeError(
                f"regularizers[{i}].params",
                f"{spec['params']!r} matches frozen parameter {frozen[0]!r} "
                f"({len(frozen)} in all); regularizers act on trained parameters only",
            )
        if not names:
            shown = ", ".join(list(named_params)[:12])
            raise RecipeError(
                f"regularizers[{i}].params",
                f"{spec['params']!r} matches no parameter; parameters "
                f"are: {shown}{', ...' if len(named_params) > 12 else ''}",
            )
        for n in names:
            if mode == "prox" and n in claimed:
                raise RecipeError(
                    f"regularizers[{i}].params",
                    f"{n} already has a prox regularizer (regularizers[{claimed[n]}]); combine them into one",
                )
            if mode == "prox":
                claimed[n] = i
        for n in names:  # a dry run on each parameter: shape problems fail now, not mid-training
            try:
                with torch.no_grad():
                    reg.penalty(named_params[n].detach().clone())
                    reg.prox(named_params[n].detach().clone(), 0.0)
            except (ValueError, TypeError, RuntimeError, IndexError) as err:
                raise RecipeError(
                    f"regularizers[{i}]",
                    f"cannot apply to {n} {tuple(named_params[n].shape)}: {str(err).splitlines()[0]}",
                ) from None
        entry = AttachedRegularizer(i, spec, reg, schedule, mode, {n: named_params[n] for n in names})
        attached.append(entry)
        if mode == "prox":
            prox_pairs.append(
                (list(entry.named.values()), reg, entry.prox_step if entry.prox_lr is not None else None)
            )
    return ProxOptimizer(optimizer, regularizers=prox_pairs), attached


def describe_pruning(specs: list[dict]) -> str:
    """What sets the sparsity of a recipe's regularizers, in one line (``rlprox eval``
    prints it): a hard top-k (``exact_k``, or a ``topk`` projection) decides it whatever λ
    is; otherwise the regularizers themselves do."""
    if not specs:
        return "none (dense)"
    parts = []
    for spec in specs:
        kind = spec.get("type", "?")
        lam = spec.get("lam", "lam_schedule" if "lam_schedule" in spec or "schedule" in spec else 0)
        if kind == "topk" or spec.get("exact_k"):
            parts.append(f"{kind} λ={lam} + hard top-k (k={spec.get('k')}): the top-k projection sets the sparsity")
        else:
            step = f", prox step {spec['prox_lr']}" if "prox_lr" in spec else ""
            parts.append(f"{kind} λ={lam}{step}: the regularizer alone")
    return "; ".join(parts)
