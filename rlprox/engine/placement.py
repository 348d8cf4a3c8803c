"""Where things run: the accelerator for a recipe's ``run`` section, the module roles
on the device (trained modules, their frozen parameters, frozen modules), DDP
wrapping, FSDP2 sharding of the trained modules, and ``gathered`` (whole parameters
for sampling and evaluation).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from torch import nn

from rlprox.engine.contract import hook
from rlprox.errors import RecipeError
from rlprox.runtime import Runtime


def make_accelerator(run, project_dir: Path | None = None) -> Accelerator:
    """The accelerator for a recipe's ``run`` section. Refuses topologies the engine
    does not support with one line (before any work)."""
    from accelerate.utils import DistributedDataParallelKwargs

    use_cpu = run.cpu or not torch.cuda.is_available()
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        raise RecipeError(
            "run",
            "accelerate's FSDP launch config is not used: launch with recipes/accelerate/multi_gpu.yaml (or "
            "multi_cpu.yaml) and set run.grad_sync=fsdp; the engine shards the trained modules itself (torch FSDP2)",
        )
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise RecipeError(
            "run",
            "DeepSpeed is not supported by the rlprox engine; use "
            "run.grad_sync=fsdp to shard parameters, gradients and optimizer state",
        )
    # A process may build several engines (tests, notebooks, benchmarks) with different
    # precision settings: start from a clean accelerator state each time, keeping the
    # distributed one (PartialState).
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    kwargs = {}
    if run.grad_sync == "ddp":
        ddp = run.ddp
        kwargs["kwargs_handlers"] = [
            DistributedDataParallelKwargs(
                find_unused_parameters=ddp.find_unused_parameters,
                bucket_cap_mb=ddp.bucket_cap_mb,
                static_graph=ddp.static_graph,
                gradient_as_bucket_view=ddp.gradient_as_bucket_view,
            )
        ]
    accelerator = Accelerator(
        mixed_precision=run.mixed_precision,
        gradient_accumulation_steps=run.gradient_accumulation_steps,
        # without a GPU, cpu=True is what makes accelerate pick up a torchrun world
        # (MULTI_CPU, gloo); otherwise every process would train alone
        cpu=use_cpu,
        log_with=list(run.log_with) or None,
        project_config=ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(project_dir / "logs"))
        if project_dir
        else None,
        **kwargs,
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RecipeError(
            "run",
            f"{launched} processes were launched but accelerate joined {accelerator.num_processes} (distributed "
            f"type {accelerator.distributed_type.value}); use recipes/accelerate/multi_cpu.yaml or multi_gpu.yaml",
        )
    return accelerator


def place_modules(algo, runtime: Runtime) -> None:
    """Module roles: trained modules to the device, their frozen parameters in the
    frozen dtype; frozen modules to the device in the frozen dtype, eval, no grad."""
    device, dtype = runtime.device, runtime.frozen_dtype
    frozen = hook(algo, "frozen") or {}
    trained_ids = {id(p) for m in algo.modules.values() for p in m.parameters()}
    for name, module in frozen.items():
        if any(id(p) in trained_ids for p in module.parameters()):
            raise ValueError(f"frozen module {name!r} shares parameters with a trained module")
        module.requires_grad_(False).eval().to(device)
        if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
            module.to(dtype)
    for name, module in algo.modules.items():
        module.to(device)
        if not any(p.requires_grad for p in module.parameters()):
            raise ValueError(f"trained module {name!r} has no trainable parameters; put it in `frozen`")
        if dtype != torch.float32:
            for p in module.parameters():
                if not p.requires_grad and p.is_floating_point():
                    p.data = p.data.to(dtype)


# Library classes whose public methods are not forward passes of a trained module (a
# diffusers UNet's set_attn_processor, peft's save_pretrained, ...).
_LIBRARY_PACKAGES = frozenset({"torch", "peft", "diffusers", "transformers", "accelerate", "huggingface_hub"})


def forward_methods(module: nn.Module) -> list[str]:
    """Public methods a trained module's own classes define besides ``forward`` (a
    policy's ``act``/``value``, a GPT's ``setup_caches``): under FSDP they gather the
    module's parameters the way ``forward`` does."""
    import inspect

    names = set()
    for cls in type(module).__mro__:
        if cls is nn.Module or cls.__module__.split(".")[0] in _LIBRARY_PACKAGES:
            continue
        names |= {
            name
            for name, value in vars(cls).items()
            if inspect.isfunction(value) and not name.startswith("_") and name != "forward"
        }
    return sorted(names)


def shard_modules(algo, run, accelerator: Accelerator) -> bool:
    """``run.grad_sync: fsdp`` with several processes: shard every trained module with
    torch FSDP2 (``fully_shard``) over all processes, submodules whose class is named in
    ``run.fsdp.wrap`` as units of their own. Parameters, gradients and optimizer state
    are then split across processes; forward passes (and ``forward_methods``) gather
    the parameters, backward reduce-scatters the mean gradient. Device-neutral (tested on
    gloo, CPU). The modules stay the same objects (FSDP2 changes them in place).
    Returns whether anything was sharded."""
    if run.grad_sync != "fsdp" or accelerator.num_processes == 1:
        return False
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    wrap = set(run.fsdp.wrap)
    found = set()
    for module in algo.modules.values():
        methods = forward_methods(module)
        for sub in reversed(list(module.modules())[1:]):  # FSDP2 shards bottom-up
            if type(sub).__name__ in wrap:
                found.add(type(sub).__name__)
                fully_shard(sub, mesh=mesh, reshard_after_forward=run.fsdp.reshard_after_forward)
        fully_shard(module, mesh=mesh, reshard_after_forward=run.fsdp.reshard_after_forward)
        for name in methods:
            register_fsdp_forward_method(module, name)
    missing = sorted(wrap - found)
    if missing:
        raise RecipeError("run.fsdp.wrap", f"no trained submodule has class {missing[0]!r}")
    return True


@contextlib.contextmanager
def gathered(modules: Iterable[nn.Module], reshard_after_forward: bool = True):
    """FSDP-sharded modules hold their whole parameters inside the block, and forward
    passes run without collectives: what sampling and sharded evaluation need, where
    processes may make different numbers of forward passes (episodes of different
    lengths, uneven eval shares). Afterwards the wrapped units reshard after forward
    again as ``reshard_after_forward`` says (the roots never do: FSDP2's default). A
    no-op for modules that are not sharded."""
    from torch.distributed.fsdp import FSDPModule

    roots = list(modules)
    units = [(u, any(u is r for r in roots)) for m in roots for u in m.modules() if isinstance(u, FSDPModule)]
    if not units:
        yield
        return
    for unit, _ in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit, is_root in units:
            unit.reshard()
            unit.set_reshard_after_forward(False if is_root else reshard_after_forward, recurse=False)


def prepare_for_ddp(algo, optimizer, accelerator: Accelerator):
    """``run.grad_sync: ddp``: wrap every trained module in torch DDP through accelerate
    (the entries of ``algo.modules`` are replaced by their wrappers) and return the
    prepared optimizer."""
    names = list(algo.modules)
    *wrapped, optimizer = accelerator.prepare(*[algo.modules[n] for n in names], optimizer)
    for name, module in zip(names, wrapped):
        algo.modules[name] = module
    return optimizer
