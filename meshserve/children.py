"""Child processes that end with their parent: the kernel's parent-death signal, set from the child."""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """In the child (before exec, or first thing after it): SIGTERM me when my parent (`parent_pid`)
    dies, however it dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: Ctrl-C and stop_all() still stop children
        return
    if os.getppid() != parent_pid:  # the parent died between fork and prctl: nobody will signal us
        os.kill(os.getpid(), signal.SIGTERM)
