"""Spreading ``sample`` / ``eval`` / ``tune`` over processes: ``torchrun --nproc_per_node N -m flowturbo ...``.

How the work is split (the same for every command):

* Images are numbered globally ``0 .. n-1`` and grouped into batches of ``batch`` images aligned to that
  numbering (batch k = images ``k*batch .. (k+1)*batch - 1``). Each rank takes a contiguous run of whole
  batches (:meth:`Ranks.shard`). Image i's noise comes from its own seed ``seed + i``
  (:func:`flowturbo.noise.make_noise`) and every batch holds the same rows whatever N is, so the images do not
  depend on the number of processes: N = 1 and N = 2 with the same ``--batch`` write byte-identical PNGs.
* Rank 0 owns the output: it takes ``--out``'s lock, creates the staging folder and, only when every rank
  reported success, writes the run record and swaps the folder into place. The other ranks write their images
  into that staging folder (single node: one filesystem) or send features to rank 0 (``eval``, ``tune``).
* Failures: every phase ends with :meth:`Ranks.run_all`, an all-gather of each rank's status. A rank that
  raised makes every rank raise one :class:`RankFailure` naming it ("rank 1 failed: ..."), so the staging
  folder is removed and nothing is written. A rank that *died* (killed, crashed) breaks the collective: the
  others get an error from the process group, or are stopped by torchrun with SIGTERM, which is turned into
  the same clean failure (the staging folder is removed on the way out; a SIGKILLed rank 0's staging folder is
  debris that the next run on ``--out`` removes). ``--out`` keeps its previous complete content either way.

gloo on CPU, NCCL on GPUs (rank r uses ``cuda:LOCAL_RANK``). Without torchrun (no ``WORLD_SIZE`` or 1) nothing
here starts a process group and :class:`Ranks` is the trivial single-process split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from flowturbo.cliargs import world_size_from_env
from flowturbo.errors import FlowTurboError

T = TypeVar("T")


class RankFailure(FlowTurboError):
    """Another process of the torchrun group failed or died; nothing was written."""


def under_torchrun() -> bool:
    return world_size_from_env() > 1


@dataclasses.dataclass
class Ranks:
    """This process's place in the group, with the few collectives the commands need."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo" | "nccl" | None (single process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int, batch: int) -> tuple[int, int]:
        """This rank's images ``[start, stop)`` of ``n``: a contiguous run of whole ``batch``-image batches."""
        return self.shard_range(0, n, batch)

    def shard_range(self, lo: int, hi: int, batch: int) -> tuple[int, int]:
        """This rank's part of images ``[lo, hi)`` (``lo`` a multiple of ``batch``), in whole global batches."""
        if batch < 1:
            raise FlowTurboError(f"batch must be >= 1 image, got {batch}")
        first_batch, batches = lo // batch, -(-(hi - lo) // batch)
        first = first_batch + batches * self.rank // self.world_size
        last = first_batch + batches * (self.rank + 1) // self.world_size
        return max(lo, min(hi, first * batch)), max(lo, min(hi, last * batch))

    def barrier_all(self, what: str = "waiting for the other processes") -> None:
        if self.distributed:
            import torch.distributed as dist

            self._collective(what, dist.barrier)

    def device(self, requested: str | None) -> str | None:
        """The device of this rank: ``cuda`` / ``auto`` on a GPU machine -> ``cuda:LOCAL_RANK``."""
        if not self.distributed or requested in (None, "cpu"):
            return requested
        import torch

        if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
            return f"cuda:{self.local_rank}"
        if requested.startswith("cuda:"):
            raise FlowTurboError(f"--device {requested} names one GPU, but under torchrun every process takes its own "
                                 "(cuda:LOCAL_RANK); pass --device cuda")
        return requested

    # ------------------------------------------------------------------------------------ collectives
    def _collective(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except RuntimeError as exc:  # a peer died: gloo/NCCL report a closed connection or a timeout
            _stop_listening()
            raise RankFailure(f"a process of the torchrun group stopped during {what} ({_first_line(exc)}); "
                              "nothing was written") from None

    def all_gather(self, obj: Any, what: str = "a collective") -> list[Any]:
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        self._collective(what, lambda: dist.all_gather_object(out, obj))
        return out

    def gather(self, obj: Any, what: str = "gathering results") -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (rank order), None elsewhere."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        self._collective(what, lambda: dist.gather_object(obj, out, dst=0))
        return out

    def broadcast(self, obj: Any, what: str = "a broadcast") -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj if self.is_main else None]
        self._collective(what, lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def run_all(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on this rank, then check every rank's outcome: if any rank failed, every rank raises
        (the failed one its own error, the others a :class:`RankFailure` naming it)."""
        error: BaseException | None = None
        result: Any = None
        try:
            result = fn()
        except (FlowTurboError, Exception) as exc:  # a bug on one rank must fail the group cleanly too
            error = exc
        if not self.distributed:
            if error is not None:
                raise error
            return result
        statuses = self.all_gather(None if error is None else _describe(error), what)
        failed = [(rank, message) for rank, message in enumerate(statuses) if message is not None]
        if error is not None:
            raise error
        if failed:
            rank, message = failed[0]
            raise RankFailure(f"rank {rank} failed during {what}: {message}; nothing was written")
        return result


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, FlowTurboError) else f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _stop_listening() -> None:
    """We are failing already: a later SIGTERM from torchrun must not interrupt the clean-up."""
    with contextlib.suppress(ValueError):  # not the main thread
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _on_sigterm(signum: int, frame: Any) -> None:
    _stop_listening()
    raise RankFailure("stopped by SIGTERM (torchrun stops every process when one of them fails); nothing was "
                      "written")


@contextlib.contextmanager
def process_group(device: str | None = None) -> Iterator[Ranks]:
    """Join the torchrun group when ``WORLD_SIZE > 1`` (gloo on CPU, NCCL on CUDA) and leave it afterwards.

    Under torchrun, SIGTERM (what torchrun sends the others when one process fails) becomes a
    :class:`RankFailure`, so every ``with`` block above unwinds and removes what it staged.
    """
    world = world_size_from_env()
    if world == 1:
        yield Ranks()
        return
    import torch
    import torch.distributed as dist

    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    wants_cuda = device not in (None, "cpu") and (device != "auto" or torch.cuda.is_available())
    backend = "nccl" if wants_cuda else "gloo"
    if wants_cuda:
        torch.cuda.set_device(local_rank)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    owns = not dist.is_initialized()
    try:
        if owns:
            dist.init_process_group(backend=backend, rank=rank, world_size=world)
        yield Ranks(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, backend=backend)
    except BaseException:
        _stop_listening()  # failing: torchrun's SIGTERM must not cut the error report short
        raise
    else:
        if owns:  # leave together: a peer that closes its sockets while this one still works can abort gloo
            with contextlib.suppress(Exception):
                dist.barrier()
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, previous)
    finally:
        if owns and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


__all__ = ["RankFailure", "Ranks", "process_group", "under_torchrun", "world_size_from_env"]
