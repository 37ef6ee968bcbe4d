"""How many torch threads to run, for the command line and compose() alike.

On a shared machine threads that wait for busy cores cost far more than they give: on a busy
2-core machine `demo` on one task took 346 s with 2 threads and 43 s with 1, and 8 search steps
1.0 s quiet against 22-30 s while one other process kept one core busy. So without an explicit
number, only the cores other processes leave idle are used. Other processes only: the load
average counts this one too, and after it has just loaded a model that alone made a quiet
2-core machine look half busy and halved the threads of the search that followed.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SAMPLE_S = 0.1  # 10 clock ticks per core at the usual 100 Hz: a tenth of a core's resolution


def machine_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_ticks(stat: Path = Path("/proc/stat")) -> tuple[float, float] | None:
    """(busy, all) clock ticks since boot of the cores this process may run on (steal counts
    as busy: a virtual machine's host took it), or None where `stat` is unreadable."""
    try:
        lines = stat.read_text().splitlines()
        cores = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split() or [""]
        if name[3:].isdigit() and name.startswith("cpu") and int(name[3:]) in cores:
            # kernels before 2.6.11 have no steal column: pad the missing ones with 0
            padded = (fields + ["0"] * 8)[:8]
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, padded)
            total += user + nice + system + idle + iowait + irq + softirq + steal
            busy += user + nice + system + irq + softirq + steal
    return (busy, total) if total else None


def own_ticks() -> float:
    """The clock ticks of CPU time this process (all its threads) has used."""
    times = os.times()
    return (times.user + times.system) * os.sysconf("SC_CLK_TCK")


def busy_elsewhere() -> float | None:
    """How many cores other processes keep busy: measured over SAMPLE_S as the cores' busy
    time less this process's own, else (no /proc/stat) the 1-minute load average, which
    counts this process too; None when unknown."""
    first = cpu_ticks()
    if first is not None:
        own = own_ticks()
        time.sleep(SAMPLE_S)
        second, own_after = cpu_ticks(), own_ticks()
        if second is not None and second[1] > first[1]:
            others = (second[0] - first[0]) - (own_after - own)
            return max(0.0, machine_cores() * others / (second[1] - first[1]))
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def idle_cores() -> int | None:
    """The cores other processes leave idle, when fewer than torch's threads; None when the
    machine is quiet or its load is unknown."""
    import torch
    if torch.get_num_threads() == 1:  # nothing fewer to choose: skip the measurement
        return None
    busy = busy_elsewhere()
    if busy is None:
        return None
    idle = max(1, round(machine_cores() - busy))
    return idle if idle < torch.get_num_threads() else None


def choose_threads(requested: int | None, processes: int = 1) -> int | None:
    """`requested`, else idle_cores(); None: keep torch's setting. Without a request, each of
    `processes` processes on this machine gets a share of those cores (of torch's threads when
    quiet), at least one: N processes of a thread per core each make the threads wait."""
    if requested:
        return requested
    count = idle_cores()
    if processes > 1:
        import torch
        count = max(1, (count or torch.get_num_threads()) // processes)
    return count


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
