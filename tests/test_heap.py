"""`sixnet.core.heap.trim` gives freed pages inside glibc's heap back to the kernel."""

from __future__ import annotations

import ctypes
import ctypes.util

import pytest

from sixnet.core import heap

pytestmark = pytest.mark.skipif(not heap.trim_supported(), reason="needs glibc's malloc_trim")

CHUNK = 16 * 1024  # under glibc's mmap threshold: from the heap, not a mapping of its own
CHUNKS = 2000


def _resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


def test_freed_pages_inside_the_heap_are_given_back() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    freed = [libc.malloc(CHUNK) for _ in range(CHUNKS)]
    kept = libc.malloc(64)  # above them, so free() cannot shrink the heap's top by itself
    try:
        for block in freed:
            ctypes.memset(block, 1, CHUNK)  # resident
        for block in freed:
            libc.free(block)
        before = _resident()
        assert heap.trim()
        given_back = before - _resident()
        assert given_back > CHUNKS * CHUNK // 2, f"{given_back} bytes given back"
    finally:
        libc.free(kept)
