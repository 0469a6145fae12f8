"""dpolab.allocator: freed memory stays in the process inside the block, and only there."""

import resource

import pytest
import torch

from dpolab import allocator
from dpolab.allocator import keep_freed_memory

pytestmark = pytest.mark.skipif(allocator._glibc() is None, reason="the setting exists for glibc's malloc only")

BLOCK = 64 << 20  # above glibc's 32 MiB mmap ceiling: outside the block it is always mapped fresh
PAGES = BLOCK // resource.getpagesize()


def _faults_per_allocation(rounds: int = 12) -> list[int]:
    """Minor page faults of each of ``rounds`` allocate-fill-free cycles of a BLOCK-sized tensor."""
    faults = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.empty(BLOCK // 4)
        block.fill_(1.0)
        del block
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults


def test_inside_the_block_a_freed_block_is_reused_without_page_faults(monkeypatch):
    for name in allocator.ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    with keep_freed_memory() as active:
        assert active
        inside = _faults_per_allocation()
    outside = _faults_per_allocation()
    # Every page of a freshly mapped block faults once. Inside, the heap grows for the first cycles (torch's
    # 64-byte-aligned requests do not fit exactly into a freed block of their own size until free neighbours
    # merge), then a freed block is reused with its pages already there.
    assert min(inside) < PAGES // 20
    assert min(outside) > PAGES // 2


def test_user_malloc_settings_and_disabled_leave_malloc_alone(monkeypatch):
    for name in allocator.ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(allocator, "_glibc", lambda: calls.append("libc"))
    with keep_freed_memory(enabled=False) as active:
        assert not active
    monkeypatch.setenv("MALLOC_TOP_PAD_", str(1 << 20))
    with keep_freed_memory() as active:
        assert not active
    assert calls == []  # neither opened the C library
