"""Distributed jobs: which rank this is, DTensor-aware local views and norms, and sfdiag's
own channel between the ranks.

A rank of a job started by torch's elastic launcher (``torchrun``, ``sfdiag run
--nproc``) sees ``RANK`` / ``WORLD_SIZE`` in its environment. sfdiag talks to the other
ranks over a gloo process group of its own, built on the job's rendezvous store under
a prefix of its own, so its collectives never interleave with the script's (it needs
no ``new_group`` call that every rank of the script would have to make in step). The
audit moves per-tensor numbers by reductions (sums of squares) and broadcasts from
rank 0, and gathers only small per-rank summaries to rank 0: rank 0 receives
O(tensors + ranks), never O(ranks x tensors). Every collective has a timeout.

A DTensor grad (FSDP2's ``fully_shard``) is read through its local shard only: its
norm is the local shard's, combined across the mesh by a sum of squares in which each
shard counts once however many ranks replicate it. No grad is ever gathered whole.
"""

from __future__ import annotations

import datetime
import os
import pickle
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: seconds any of sfdiag's collectives may wait for the other ranks (SFDIAG_DIST_TIMEOUT)
DEFAULT_TIMEOUT = 60.0


# ---- tensors --------------------------------------------------------------------------------
#: per class: has it ``to_local`` (an optimizer step asks of every tensor it touches)
_LOCAL_CLASSES: dict[type, bool] = {}


def is_dtensor(t: Any) -> bool:
    """A DTensor, told without importing torch.distributed.tensor."""
    cls = type(t)
    has_local = _LOCAL_CLASSES.get(cls)
    if has_local is None:
        has_local = _LOCAL_CLASSES[cls] = hasattr(cls, "to_local")
    return has_local and hasattr(t, "placements")


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard (a view of its storage,
    detached), anything else itself."""
    if is_dtensor(t):
        return t.to_local().detach()
    return t


def replicas(t: Any) -> int:
    """On how many ranks each element of ``t`` is held: the size of the mesh dimensions
    it is replicated over (1 for a fully sharded DTensor, 1 for a plain tensor)."""
    if not is_dtensor(t):
        return 1
    count = 1
    for size, placement in zip(t.device_mesh.mesh.shape, t.placements, strict=False):
        if placement.is_replicate():
            count *= int(size)
        elif placement.is_partial():
            raise ValueError(
                "a DTensor grad with a Partial placement (not yet reduced) has no norm of its own"
            )
    return count


# ---- the job --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """This process's place in a multi-rank job, from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Job | None:
        """The job this process is a rank of, or None when it runs alone."""
        env = os.environ if environ is None else environ
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local_rank = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError:
            return None
        if world <= 1 or not 0 <= rank < world:
            return None
        return cls(rank, world, local_rank)

    @property
    def leader(self) -> bool:
        return self.rank == 0


def timeout_seconds() -> float:
    try:
        value = float(os.environ.get("SFDIAG_DIST_TIMEOUT", DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT
    return value if value > 0 else DEFAULT_TIMEOUT


def _until_done(work: Any) -> None:
    """Wait for a collective in short sleeps, not inside gloo: between them Python runs its
    signal handlers, so Ctrl-C reaches a rank waiting for ranks that Ctrl-C already stopped
    (inside gloo's wait it would be held until the group's timeout). The first looks come
    quickly: a collective of a few numbers among local ranks takes ~100 µs."""
    pause = 1e-5
    while not work.is_completed():
        time.sleep(pause)
        pause = min(pause * 2, 1e-3)


class ChannelError(RuntimeError):
    """sfdiag's own collectives failed (a rank gone, a timeout)."""


class Channel:
    """sfdiag's gloo process group among the job's ranks (see the module doc)."""

    def __init__(self, job: Job, group: Any, timeout: float) -> None:
        self.job = job
        self._group = group
        self.timeout = timeout
        self.broken: str | None = None  # why the channel stopped working, once it did

    @classmethod
    def open(cls, job: Job, timeout: float | None = None, name: str = "") -> Channel | None:
        """The channel over the launcher's store (torchrun's agent store) or, failing that,
        the script's default process group's store; None when there is neither yet.
        ``name``: a channel of its own beside the first (its own prefix in the store)."""
        import torch.distributed as torch_dist

        seconds = timeout if timeout is not None else timeout_seconds()
        delta = datetime.timedelta(seconds=seconds)
        store = None
        if (
            os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and "MASTER_ADDR" in os.environ
            and "MASTER_PORT" in os.environ
        ):
            store = torch_dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                job.world_size,
                is_master=False,
                timeout=delta,
            )
        elif torch_dist.is_available() and torch_dist.is_initialized():
            from torch.distributed import distributed_c10d

            store = distributed_c10d._get_default_store()
        if store is None:
            return None
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        prefixed = torch_dist.PrefixStore(f"sfdiag/{attempt}{name}", store)
        group = torch_dist.ProcessGroupGloo(prefixed, job.rank, job.world_size, delta)
        return cls(job, group, seconds)

    # ---- collectives (every rank calls each, in the same order) --------------------------
    def _live(self) -> Any:
        """The group, while the channel works (nothing is started on one whose calls may no
        longer pair up among the ranks)."""
        if self.broken:
            raise ChannelError(self.broken)
        return self._group

    def _wait(self, work: Any, what: str) -> None:
        try:  # (started on a working channel: ``_live``, or ``close``'s own check)
            _until_done(work)
            work.wait()
        except KeyboardInterrupt:
            # Ctrl-C reached this rank inside a collective that another rank may never
            # join: what follows on this group would pair with the wrong calls
            self.abandon(f"sfdiag's {what} across ranks was interrupted")
            raise
        except Exception as exc:
            self.broken = f"sfdiag's {what} across ranks failed: {type(exc).__name__}: {exc}"
            raise ChannelError(self.broken) from exc

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over every rank, in place (a CPU tensor)."""
        self._wait(self._live().allreduce([tensor]), "sum")
        return tensor

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as torch_dist

        options = torch_dist.AllreduceOptions()
        options.reduceOp = torch_dist.ReduceOp.MAX
        self._wait(self._live().allreduce([tensor], options), "max")
        return tensor

    def broadcast(self, tensor: torch.Tensor, source: int = 0) -> torch.Tensor:
        """Rank ``source``'s ``tensor`` on every rank, in place."""
        import torch.distributed as torch_dist

        options = torch_dist.BroadcastOptions()
        options.rootRank = source
        self._wait(self._live().broadcast([tensor], options), "broadcast")
        return tensor

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (small: a summary) on rank 0, in rank order; None elsewhere."""
        import torch
        import torch.distributed as torch_dist

        payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        size = self.max(torch.tensor([len(payload)], dtype=torch.int64))
        width = int(size.item())
        mine = torch.zeros(width + 8, dtype=torch.uint8)
        mine[:8] = torch.tensor([len(payload)], dtype=torch.int64).view(torch.uint8)
        mine[8 : 8 + len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        leader = self.job.leader
        outputs = [[torch.empty_like(mine) for _ in range(self.job.world_size)]] if leader else []
        options = torch_dist.GatherOptions()
        options.rootRank = 0
        self._wait(self._live().gather(outputs, [mine], options), "gather")
        if not leader:
            return None
        objects = []
        for buffer in outputs[0]:
            length = int(buffer[:8].view(torch.int64).item())
            objects.append(pickle.loads(buffer[8 : 8 + length].numpy().tobytes()))  # noqa: S301
        return objects

    def abandon(self, why: str) -> None:
        """Leave the channel without waiting for the other ranks (its calls may no longer
        pair up among them). Its group is never freed: a gloo group's destructor joins its
        threads, and one may be inside a collective no rank will join, until the group's
        timeout (a minute; the launcher kills the job first). One object, left to the OS."""
        import ctypes

        self.broken = self.broken or why
        if self._group is not None:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(self._group))
        self._group = None

    def close(self) -> None:
        """Leave the channel once every rank is done with it (a barrier first: a rank that
        tears its connections down while another still reads them aborts that one)."""
        if self.broken is None:
            try:
                self._wait(self._group.barrier(), "barrier")
            except ChannelError:
                pass
        self._group = None
