"""The DeepSpeed CPU all-reduce buffer's cleanup, without a process group (a world of one)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from distil_scale.distributed import deepspeed_shm_name, unlink_deepspeed_shm

SHM = Path("/dev/shm")


@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm (POSIX shared memory) here")
def test_this_ranks_deepspeed_buffer_is_unlinked_and_no_other_ranks(monkeypatch):
    port = str(os.getpid())  # a name no real run on this host is using
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", port)
    mine, peer = SHM / deepspeed_shm_name(0), SHM / deepspeed_shm_name(1)
    # DeepSpeed's shm.cpp: "%s_%d_%s_%s" (prefix, uid, MASTER_ADDR, MASTER_PORT) + "_%d" (rank)
    assert mine.name == f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_0"
    try:
        mine.write_bytes(b"\0")
        peer.write_bytes(b"\0")
        unlink_deepspeed_shm()
        assert not mine.exists() and peer.exists()
        unlink_deepspeed_shm()  # already gone: nothing to do
    finally:
        for p in (mine, peer):
            p.unlink(missing_ok=True)
