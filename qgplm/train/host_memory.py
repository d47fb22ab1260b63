"""How the training process's CPU allocator treats freed memory (`cpu_allocator=` in conf/run.yaml).

A training step allocates and frees the same large temporaries every step: the fake-quantized copy of
every weight, the [tokens, vocabulary] logits and probabilities, the embedding's gradient. glibc's
malloc serves every block above 32 MiB with a fresh `mmap` and returns it to the kernel on `free`,
so each step touches every page of those blocks anew and the kernel faults and zeroes them one 4 KiB
page at a time. On a 2-core virtual machine `reuse` made a SmolLM2-135M QuantGPT step 20% (fp32) to
44% (bf16) faster (docs/results.md, The CPU allocator). PyTorch's CUDA allocator keeps freed blocks for
reuse; its CPU allocator leaves that to malloc.

`reuse` (the default) tells glibc to serve large blocks from its heap and to keep freed memory in the
process (`mallopt(M_MMAP_MAX, 0)` and a 2 GiB trim threshold), so the next step reuses pages that are
already mapped. The peak RSS grows a little (4-10% measured there: a freed block cannot always serve a
differently sized request), and memory freed after the peak is returned to the kernel only when the
process exits. `system`
leaves glibc's defaults. Training results are bit for bit the same either way: only where the bytes
live changes. Processes without glibc (macOS, musl) keep their own allocator's behaviour, and `reuse`
says so once in the log.
"""

from __future__ import annotations

import logging

from qgplm.libc import glibc

log = logging.getLogger(__name__)

CPU_ALLOCATORS = ("reuse", "system")

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: keep up to 2 GiB of free memory at the heap's top

_applied: str | None = None


def set_cpu_allocator(mode: str) -> bool:
    """Apply `mode` (one of CPU_ALLOCATORS) to this process; True where it took effect.

    `system` leaves malloc untouched; after a `reuse` in the same process (tests, sweeps run in one
    process) it sets glibc's default mmap count and trim threshold back for the blocks allocated
    from then on."""
    global _applied
    if mode not in CPU_ALLOCATORS:
        raise ValueError(f"cpu_allocator must be one of {CPU_ALLOCATORS}, got {mode!r}")
    if mode == _applied or (mode == "system" and _applied is None):
        return True  # `system` before any `reuse`: glibc's defaults were never touched
    libc = glibc()
    if libc is None:
        if mode == "reuse":
            log.info("cpu_allocator=reuse: this process has no glibc malloc, its own allocator is left as is")
        return False
    if mode == "reuse":
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    else:  # glibc's defaults: mmap for large blocks (up to 65,536 of them), 128 KiB trim threshold
        ok = libc.mallopt(_M_MMAP_MAX, 65536) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024) == 1
    _applied = mode if ok else None
    return ok
