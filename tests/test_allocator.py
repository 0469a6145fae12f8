"""dpolab.fast.allocator: freed memory stays in the process inside the block, and only there."""

import resource

import pytest
import torch

from dpolab.fast import allocator
from dpolab.fast.allocator import keep_freed_memory

needs_glibc = pytest.mark.skipif(allocator._glibc() is None, reason="the setting exists for glibc's malloc only")

BLOCK = 64 << 20  # above glibc's 32 MiB mmap ceiling: by default such a block is mapped fresh when no free chunk fits
PAGES = BLOCK // resource.getpagesize()


def _faults_per_allocation(rounds: int = 20) -> list[int]:
    """Minor page faults of each of ``rounds`` allocate-fill-free cycles of a BLOCK-sized tensor."""
    faults = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.empty(BLOCK // 4)
        block.fill_(1.0)
        del block
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


@needs_glibc
def test_inside_the_block_a_freed_block_is_reused_and_afterwards_returned(monkeypatch):
    for name in allocator.ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    with keep_freed_memory() as active:
        assert active
        inside = _faults_per_allocation()
        resident_inside = _resident_bytes()
    resident_after = _resident_bytes()
    # Every page of a freshly mapped block faults once. Inside, the heap grows for the first cycles (torch's
    # 64-byte-aligned requests do not fit into a freed block of their own size until free neighbours merge; in
    # practice by the 8th cycle), then a freed block is reused with its pages already there, and from then on
    # the same block every time.
    assert inside[-1] < PAGES // 20
    # Leaving the block trims the heap: at least the last freed block, whose pages were resident, goes back to
    # the system. (Whether a later allocation outside is mapped fresh or reuses a free chunk left in the middle
    # of the heap is glibc's ordinary choice, so it is not asserted.)
    assert resident_inside - resident_after >= BLOCK


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


class _FakeLibc:
    """Records mallopt / malloc_trim calls; mallopt refuses the parameters in ``refuse`` (returns 0, as glibc does)."""

    def __init__(self, refuse=()):
        self.calls, self.refuse = [], set(refuse)

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 0 if param in self.refuse else 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_thresholds_are_set_inside_and_restored_after_even_on_error(monkeypatch):
    for name in allocator.ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    libc = _FakeLibc()
    monkeypatch.setattr(allocator, "_glibc", lambda: libc)
    with pytest.raises(RuntimeError), keep_freed_memory() as active:
        assert active
        assert libc.calls == [("mallopt", p, v) for p, v in allocator.KEEP.items()]
        raise RuntimeError("training failed")
    after = libc.calls[len(allocator.KEEP):]
    assert after == [("mallopt", p, allocator.AFTER[p]) for p in allocator.KEEP] + [("malloc_trim", 0)]


def test_a_refused_threshold_is_reported_and_only_the_applied_ones_restored(monkeypatch):
    for name in allocator.ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    libc = _FakeLibc(refuse={allocator.M_TOP_PAD})
    monkeypatch.setattr(allocator, "_glibc", lambda: libc)
    with keep_freed_memory() as active:
        assert not active
    restored = [c for c in libc.calls[len(allocator.KEEP):] if c[0] == "mallopt"]
    assert restored == [("mallopt", p, allocator.AFTER[p]) for p in allocator.KEEP if p != allocator.M_TOP_PAD]
    assert libc.calls[-1] == ("malloc_trim", 0)
