"""sfdiag.dist without ranks: the job from the environment, and what a DTensor's shard
counts for in a global norm."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.distributed.tensor import Partial, Replicate, Shard

from sfdiag.dist import Job, is_dtensor, local, replicas


class FakeDTensor:
    """Just what sfdiag reads of a DTensor: its local shard, placements and mesh shape."""

    def __init__(self, placements, mesh_shape, shard):
        self.placements = placements
        self.device_mesh = SimpleNamespace(mesh=torch.empty(mesh_shape))
        self._shard = shard

    def to_local(self):
        return self._shard


@pytest.mark.parametrize(
    ("placements", "mesh", "count"),
    [
        ((Shard(0),), (4,), 1),  # FSDP: every element on one rank
        ((Replicate(), Shard(0)), (2, 4), 2),  # HSDP: sharded within a group, 2 groups
        ((Replicate(),), (8,), 8),
        ((Shard(0), Shard(1)), (2, 2), 1),
    ],
)
def test_replicas_count_each_shard_once(placements, mesh, count):
    tensor = FakeDTensor(placements, mesh, torch.ones(3))
    assert is_dtensor(tensor) and replicas(tensor) == count
    assert local(tensor) is not None and local(tensor).shape == (3,)


def test_partial_grads_and_plain_tensors():
    with pytest.raises(ValueError, match="Partial"):
        replicas(FakeDTensor((Partial(),), (2,), torch.ones(1)))
    plain = torch.ones(2)
    assert not is_dtensor(plain) and replicas(plain) == 1 and local(plain) is plain


@pytest.mark.parametrize(
    ("env", "job"),
    [
        ({}, None),
        ({"WORLD_SIZE": "1", "RANK": "0"}, None),
        ({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"}, Job(2, 4, 0)),
        ({"WORLD_SIZE": "4", "RANK": "7"}, None),
        ({"WORLD_SIZE": "two", "RANK": "0"}, None),
    ],
)
def test_the_job_comes_from_the_launchers_environment(env, job):
    assert Job.from_env(env) == job


def test_ctrl_c_reaches_a_rank_waiting_for_a_rank_that_stopped():
    """A rank inside sfdiag's collective when Ctrl-C comes waits for ranks that Ctrl-C may
    have stopped first: the wait gives way to it at once (not at the group's timeout, long
    after the launcher killed the job), and the channel is left at once, its calls no
    longer in step among the ranks. Two ranks of a real gloo group, one a thread that never
    joins."""
    import datetime
    import os
    import signal
    import threading
    import time

    import torch.distributed as torch_dist

    from sfdiag.dist import Channel, ChannelError

    store = torch_dist.HashStore()
    timeout = datetime.timedelta(seconds=60)
    other: list = []
    joined = threading.Thread(
        target=lambda: other.append(torch_dist.ProcessGroupGloo(store, 0, 2, timeout))
    )
    joined.start()
    group = torch_dist.ProcessGroupGloo(store, 1, 2, timeout)
    joined.join()
    channel = Channel(Job(1, 2, 1), group, 60.0)
    timer = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    start = time.monotonic()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        channel.broadcast(torch.zeros(3))  # rank 0 never broadcasts
    assert time.monotonic() - start < 10
    assert "interrupted" in channel.broken
    with pytest.raises(ChannelError):
        channel.sum(torch.ones(1))
    # left at once: a gloo group freed now would wait out the broadcast in its thread
    start = time.monotonic()
    channel.abandon("interrupted")
    del group
    assert time.monotonic() - start < 10
