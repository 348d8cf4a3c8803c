"""The trainer registry.

Each trainer module registers a ``TrainerSpec`` when it is imported: its recipe
sections (name -> config dataclass), its ``build(recipe, runtime, loss_terms)``, its
``validate(recipe)`` (which may return what it resolved: ``recipe.setup``), the
counts that must be positive, its minibatches per epoch (``rlprox.recipe.validate``
checks both, once for every trainer), what its evaluation takes and the keys a resume
may not change. ``build`` resolves everything the trainer will need (reward models,
eval classifiers, reference models): the engine calls it under
``main_process_first``, so a zoo model missing from the cache is built once, before
any hook runs. ``rlprox.recipe`` and the CLI look
trainers up here; the built-in ones are *lazy* (the registry knows which module
registers each name and imports only the one a recipe asks for), so importing the
recipe layer loads no trainer.

A trainer defined elsewhere (a test, a user package) registers itself the same way::

    register_trainer(TrainerSpec(name="bandit", sections={"bandit": BanditConfig}, build=build_bandit))

or a recipe names it as a plugin, ``algo: "mypkg.trainers:SPEC"`` (a ``TrainerSpec``
object), which also makes checkpoints of it loadable by ``rlprox eval`` in a fresh
process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from rlprox.errors import RecipeError, RegistryError
from rlprox.registry import Registry

BUILTIN = {
    "loop": "rlprox.algos.loop",
    "policyflow": "rlprox.algos.policyflow",
    "ppo": "rlprox.algos.ppo",
    "sparse": "rlprox.algos.sparse",
    "vapi": "rlprox.algos.vapi",
}

EVAL_FLAGS = ("deterministic", "prompts", "guidance_scale")  # optional `rlprox eval` flags a trainer may accept


@dataclass(frozen=True)
class TrainerSpec:
    """What the engine, the recipe parser and the CLI need to know about a trainer."""

    name: str
    # build(recipe, runtime, loss_terms) -> Algorithm (rlprox.engine.Algorithm); loss_terms: the recipe's loss-side
    # regularizers (rlprox.prox.attach.LossTerms), which its loss adds
    build: Callable[..., Any]
    sections: dict[str, type] = field(default_factory=dict)  # recipe section -> config dataclass, in order
    # validate(recipe): cross-field checks (RecipeError); what it returns (what it resolved without loading weights)
    # is kept as recipe.setup for build
    validate: Callable[[Any], Any] | None = None
    counts: tuple[str, ...] = ()  # "section.field" keys that must be > 0 (checked before validate)
    # minibatches_per_epoch(recipe): optimizer steps per epoch at run.gradient_accumulation_steps 1, which
    # run.gradient_accumulation_steps must divide (else a step would span epochs); None: not checked
    minibatches_per_epoch: Callable[[Any], int] | None = None
    description: str = ""  # one line for `rlprox --help` / docs
    eval_unit: Literal["episodes", "samples", "examples"] = "episodes"  # what `rlprox eval --num` counts
    eval_flags: tuple[str, ...] = ()  # subset of EVAL_FLAGS this trainer's evaluate() honours
    loss_inputs: tuple[str, ...] = ()  # what its loss offers loss-side regularizers (its loss_terms)
    # "section.field" keys that fix the shape of the saved state (e.g. loop.finetune: a LoRA adapter or the
    # whole model): a resume must give them the value saved in the checkpoint's recipe (checked before any build)
    resume_keys: tuple[str, ...] = ()
    compiles: bool = False  # honours run.compile (torch.compile of its rollout forward and update loss)

    def __post_init__(self):
        unknown = set(self.eval_flags) - set(EVAL_FLAGS)
        if unknown:
            raise ValueError(f"trainer {self.name!r}: unknown eval flags {sorted(unknown)}; known: {EVAL_FLAGS}")


TRAINERS = Registry("algorithm", lazy=BUILTIN)


def register_trainer(spec: TrainerSpec) -> TrainerSpec:
    TRAINERS.register(spec.name, spec, description=spec.description)
    return spec


def trainer_spec(name: str) -> TrainerSpec:
    """The trainer a recipe's ``algo`` names: a registered name or ``"module:SPEC"``;
    a RecipeError naming ``algo`` otherwise."""
    if not isinstance(name, str):
        raise RecipeError("algo", f"expected a trainer name (got {name!r}); known: {', '.join(TRAINERS.names())}")
    try:
        spec = TRAINERS.get(name)
    except RegistryError as err:
        raise RecipeError("algo", str(err)) from None
    if not isinstance(spec, TrainerSpec):
        raise RecipeError("algo", f"{name!r} is a {type(spec).__name__}, not a rlprox.algos.TrainerSpec")
    return spec
