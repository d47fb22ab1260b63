"""This process's C library, where it is glibc: the malloc controls qgplm uses live only there."""

from __future__ import annotations

import ctypes
import ctypes.util


def glibc() -> ctypes.CDLL | None:
    """glibc, loaded; None elsewhere (musl, macOS, Windows), where its malloc_trim / mallopt do not exist."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None
