"""Gradient averaging over processes when neither DDP nor FSDP does it
(``run.grad_sync``: auto, allreduce, shm): ``GradientAverager`` (one flat all-reduce
per optimizer step) and ``SharedMemoryAverager`` (processes on one host sum each
other's gradients in shared memory), and ``make_gradient_sync``, which picks one.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from rlprox.errors import RecipeError


class GradientAverager:
    """Averages gradients over processes with one flat all-reduce per optimizer step
    (per dtype and device; chunked above ``bucket_numel`` elements).

    Every parameter's ``.grad`` is bound once as a view into a flat buffer, so autograd
    accumulates straight into it and the all-reduce runs on that buffer with no
    flatten/unflatten copies; after the step the buffer is zeroed in place (the views
    stay). A parameter that got no gradient on this process contributes zeros, so
    ranks never disagree on the layout. If something rebinds a ``.grad`` (e.g. a
    ``zero_grad(set_to_none=True)``), it is copied back into the buffer first.
    """

    def __init__(self, params: list[torch.nn.Parameter], world: int, bucket_numel: int = 1 << 26):
        self.world, self.bucket_numel = world, bucket_numel
        self.params = list(params)
        self.buffers: list[torch.Tensor] = []
        self.slots: list[tuple[torch.nn.Parameter, torch.Tensor, int, int]] = []  # (param, buffer, offset, numel)
        by_kind: dict[tuple, list] = {}
        for p in self.params:
            by_kind.setdefault((p.dtype, p.device), []).append(p)
        for (dtype, device), group in by_kind.items():
            flat = torch.zeros(sum(p.numel() for p in group), dtype=dtype, device=device)
            self.buffers.append(flat)
            offset = 0
            for p in group:
                self.slots.append((p, flat, offset, p.numel()))
                offset += p.numel()
        self.bind()

    def bind(self) -> None:
        for p, flat, offset, n in self.slots:
            view = flat[offset : offset + n]
            if p.grad is not None:
                if p.grad.data_ptr() == view.data_ptr():
                    continue
                view.copy_(p.grad.reshape(-1))
            else:
                view.zero_()
            p.grad = view.view_as(p)

    def __call__(self) -> None:
        self.bind()
        for flat in self.buffers:
            for start in range(0, flat.numel(), self.bucket_numel):
                self._average(flat[start : start + self.bucket_numel])

    def _average(self, chunk: torch.Tensor) -> None:
        import torch.distributed as dist

        dist.all_reduce(chunk)
        chunk.div_(self.world)

    def zero(self) -> None:
        for flat in self.buffers:
            flat.zero_()

    def close(self) -> None:
        pass


class SharedMemoryAverager(GradientAverager):
    """``GradientAverager`` for processes on one x86-64 host, CPU tensors: each process
    writes its gradient into its slot of a shared-memory buffer and publishes a step
    counter; every process then sums the slots in rank order (identical results on
    every rank). For a small policy on a few cores this is several times faster than a
    gloo all-reduce interleaved with compute (benchmarks/ppo_scaling.py). Slots are
    double-buffered: a process can only start writing step k + 2 after every process has
    published step k + 1, i.e. finished reading step k. Publishing relies on x86's
    ordered stores; other CPUs use ``GradientAverager``. The segment is unlinked as soon
    as every process has mapped it, so nothing is left in /dev/shm even after a crash. A
    process that waits more than ``timeout`` seconds for the others raises.
    """

    def __init__(self, params: list[torch.nn.Parameter], world: int, rank: int, timeout: float = 600.0):
        super().__init__(params, world, bucket_numel=1 << 62)
        from multiprocessing import shared_memory

        import torch.distributed as dist

        self.rank, self.timeout = rank, timeout
        numel = [flat.numel() for flat in self.buffers]
        data_bytes = 2 * world * sum(n * flat.element_size() for n, flat in zip(numel, self.buffers))
        data_bytes = -(-data_bytes // 64) * 64
        names = [f"rlprox-{os.getpid()}-{int(time.time() * 1e6) % 10**9}" if rank == 0 else None]
        if rank == 0:
            self.shm = shared_memory.SharedMemory(name=names[0], create=True, size=data_bytes + 64 * world)
        dist.broadcast_object_list(names, src=0)
        if rank != 0:
            self.shm = shared_memory.SharedMemory(name=names[0])
            _untrack(self.shm)  # rank 0's unlink() below unregisters its own
        # one cache line per process for its step counter
        self.seq = np.ndarray((world, 8), np.int64, self.shm.buf, data_bytes)
        self.seq[rank, 0] = 0
        self.slots_shared = []
        offset = 0
        for flat in self.buffers:
            nbytes = 2 * world * flat.numel() * flat.element_size()
            view = torch.frombuffer(self.shm.buf, dtype=flat.dtype, count=2 * world * flat.numel(), offset=offset)
            self.slots_shared.append(view.view(2, world, flat.numel()))
            offset += nbytes
        self.step = 0
        dist.barrier()
        if rank == 0:
            self.shm.unlink()  # mapped by everyone: the segment lives until the last process unmaps it

    @staticmethod
    def usable(params: list[torch.nn.Parameter], world: int) -> bool:
        import platform

        local = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
        return (
            world > 1
            and local == world
            and platform.machine().lower() in ("x86_64", "amd64")
            and all(p.device.type == "cpu" for p in params)
            and sum(p.numel() for p in params) <= 1 << 26
        )

    def __call__(self) -> None:
        self.bind()
        self.step += 1
        k = self.step
        for flat, shared in zip(self.buffers, self.slots_shared):
            shared[k % 2, self.rank].copy_(flat)
        self.seq[self.rank, 0] = k  # publish after the data (x86 stores stay ordered)
        self._wait(k)
        for flat, shared in zip(self.buffers, self.slots_shared):
            slot = shared[k % 2]
            flat.copy_(slot[0])
            for j in range(1, self.world):
                flat.add_(slot[j])
            flat.div_(self.world)

    def _wait(self, k: int) -> None:
        seq = self.seq
        spins, start = 0, None
        for j in range(self.world):
            while seq[j, 0] < k:
                spins += 1
                if spins > 2000:  # the other process is far behind: stop burning its core
                    os.sched_yield()
                    if start is None:
                        start = time.monotonic()
                    elif spins % 4096 == 0 and time.monotonic() - start > self.timeout:
                        raise RuntimeError(
                            f"process {j} did not reach gradient step {k} "
                            f"within {self.timeout:.0f} s (it died or hangs)"
                        )

    def close(self) -> None:
        self.slots_shared, self.seq = [], None
        try:
            self.shm.close()
        except BufferError:  # a tensor view still alive; the OS unmaps at exit
            pass


def _untrack(shm) -> None:
    """Python < 3.13 registers every attached segment with the resource tracker, which
    would unlink it (and warn) when any one process exits; we unlink it ourselves."""
    try:
        from multiprocessing import resource_tracker

        resource_tracker.unregister(shm._name, "shared_memory")
    except Exception:  # noqa: BLE001  (3.13+: not registered)
        pass


def make_gradient_sync(params: list[torch.nn.Parameter], grad_sync: str, accelerator) -> GradientAverager:
    """The averager ``run.grad_sync`` asks for when neither DDP nor FSDP syncs the
    gradients and several processes train: shared memory (``shm``, or ``auto`` where it
    is usable), else one flat all-reduce."""
    world = accelerator.num_processes
    usable = SharedMemoryAverager.usable(params, world)
    if grad_sync == "shm" and not usable:
        raise RecipeError(
            "run.grad_sync", "shm needs every process on one x86-64 host with CPU parameters; use auto or allreduce"
        )
    if grad_sync == "shm" or (grad_sync == "auto" and usable):
        return SharedMemoryAverager(params, world, accelerator.process_index)
    return GradientAverager(params, world)
