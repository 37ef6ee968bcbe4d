"""How many torch threads to run, for the command line and compose() alike.

On a shared machine threads that wait for busy cores cost far more than they give: on a busy
2-core machine `demo` on one task took 346 s with 2 threads and 43 s with 1, and 8 search steps
1.0 s quiet against 22-30 s while one other process kept one core busy. So without an explicit
number, only the cores other processes leave idle are used.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator


def machine_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def idle_cores() -> int | None:
    """The cores other processes leave idle (1-minute load average), when fewer than torch's
    threads; None when the machine is quiet or its load is unknown."""
    import torch
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    idle = max(1, round(machine_cores() - load))
    return idle if idle < torch.get_num_threads() else None


def choose_threads(requested: int | None) -> int | None:
    """`requested`, else idle_cores(); None: keep torch's setting."""
    return requested or idle_cores()


@contextmanager
def torch_threads(requested: int | None) -> Iterator[int]:
    """torch's intra-op threads set to choose_threads(requested) inside the block, the caller's
    setting restored after it (also when it raises). Yields the threads in use."""
    import torch
    before = torch.get_num_threads()
    threads = choose_threads(requested) or before
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
