"""How many CPU threads a training process uses, chosen at the start and adapted while it runs.

On a CPU that other programs share, more threads than free cores is far slower than fewer: the OpenMP
threads that torch runs wait for each other by spinning, and a spinning thread that shares a core with
another program's thread wastes the time slice that thread needed (a small model can slow down many
times over). ``num_threads: auto`` therefore takes every core when the machine is idle and leaves the
cores other processes keep busy, and :class:`ThreadTuner` re-checks that every few seconds during
training, so a run adapts when a compile job starts or ends beside it.

``OMP_WAIT_POLICY=PASSIVE`` (OpenMP threads sleep instead of spinning) helps with the same problem but
can only be set before the OpenMP runtime loads, which happens when ``torch`` is imported: the
``mobilemllm train`` command sets it (unless the environment already does) before it imports torch, see
:func:`prefer_passive_omp_wait`. Python callers that import torch themselves set it in their environment.

A thread count that changes during a run can change float summation order in some kernels, so a run with
``auto`` is not bit-for-bit reproducible on a busy machine; a fixed ``num_threads`` is.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Iterator

import torch


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask; all cores where that is unknown)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _proc_stat() -> tuple[int, int]:
    """(all jiffies, idle + iowait jiffies) summed over the machine's CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    return sum(vals[:8]), vals[3] + (vals[4] if len(vals) > 4 else 0)


def busy_cores(interval: float = 0.5) -> float:
    """How many cores other work keeps busy right now: /proc/stat sampled over ``interval`` seconds (this
    process waits meanwhile, so it counts itself out; the 1-minute load average would count the work this
    process did just before, e.g. a test session's earlier tests). Falls back to the load average."""
    try:
        t0, i0 = _proc_stat()
        time.sleep(interval)
        t1, i1 = _proc_stat()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    total = t1 - t0
    cores = os.cpu_count() or 1
    return 0.0 if total <= 0 else cores * (1.0 - (i1 - i0) / total)


def cpu_threads(setting: int | str | None, world_size: int = 1, busy: float | None = None,
                cores: int | None = None) -> int | None:
    """Threads per process: an int, or "auto": every core when the machine is idle, fewer when other
    processes keep cores busy right now (OpenMP threads that wait on a busy CPU spin and slow a small
    model down many times over). ``busy``: cores in use by others (default: measured, :func:`busy_cores`)."""
    if setting in (None, 0):
        return None
    cores = cores or usable_cores()
    if setting == "auto":
        busy = busy_cores() if busy is None else busy
        n = cores if busy < 0.75 else max(1, cores - int(busy + 0.5))
    else:
        n = int(setting)
    return max(1, n // world_size)


class CpuMeter:
    """Cores that *other* processes kept busy since the previous call, without waiting: the machine's busy
    time from /proc/stat minus this process's own CPU time over the same wall-clock interval. Returns
    ``(others, own)`` in cores, or None where /proc/stat cannot be read (not Linux)."""

    def __init__(self) -> None:
        self._last = self._read()

    @staticmethod
    def _read():
        try:
            total, idle = _proc_stat()
        except (OSError, ValueError, IndexError):
            return None
        return total, idle, time.process_time(), time.monotonic()

    def __call__(self) -> tuple[float, float] | None:
        now, last = self._read(), self._last
        self._last = now
        if now is None or last is None or now[0] <= last[0] or now[3] <= last[3]:
            return None
        cores = os.cpu_count() or 1
        busy = cores * (1.0 - (now[1] - last[1]) / (now[0] - last[0]))
        own = (now[2] - last[2]) / (now[3] - last[3])
        return max(0.0, busy - own), own


class ThreadTuner:
    """``num_threads: auto`` while training: every ``every_s`` seconds, re-measure the cores other processes
    use and move torch's thread count to what :func:`cpu_threads` would pick now. A change needs two
    measurements in a row that agree, so one short burst of other work does not make the count flap.

    ``sample()`` returns ``(cores used by other processes, cores used by this one)`` (default: a
    :class:`CpuMeter`); sibling ranks of a ``torchrun`` job on the same CPU are assumed to use as much as
    this one and are not counted as "other" work. ``set_threads``/``get_threads`` default to torch's."""

    def __init__(self, world_size: int = 1, every_s: float = 10.0, *,
                 sample: Callable[[], tuple[float, float] | None] | None = None,
                 clock: Callable[[], float] = time.monotonic, cores: int | None = None,
                 set_threads: Callable[[int], None] | None = None, get_threads: Callable[[], int] | None = None):
        self.world_size = world_size
        self.every_s = every_s
        self.sample = sample or CpuMeter()
        self.clock = clock
        self.cores = cores or usable_cores()
        self.set_threads = set_threads or torch.set_num_threads
        self.get_threads = get_threads or torch.get_num_threads
        self._next = clock() + every_s
        self._pending: int | None = None

    def target(self, others: float, own: float) -> int:
        """The thread count for this process when other processes use ``others`` cores."""
        others = max(0.0, others - (self.world_size - 1) * own)
        return cpu_threads("auto", self.world_size, busy=others, cores=self.cores) or 1

    def step(self) -> int | None:
        """Call once per training step (cheap); returns the new thread count when it changed."""
        now = self.clock()
        if now < self._next:
            return None
        self._next = now + self.every_s
        measured = self.sample()
        if measured is None:
            return None
        want = self.target(*measured)
        if want == self.get_threads():
            self._pending = None
            return None
        if self._pending != want:  # the first time: wait for a second measurement that agrees
            self._pending = want
            return None
        self._pending = None
        self.set_threads(want)
        return want


def prefer_passive_omp_wait() -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` for this process if nothing chose a policy and torch (whose OpenMP
    runtime reads the variable once, when it loads) is not imported yet. Returns whether it was set.

    Passive waiting makes idle OpenMP threads sleep instead of spinning: on a CPU shared with other work a
    spinning thread steals the core another program's thread needs, which is what makes an oversubscribed
    run many times slower. Called by the ``train`` command before anything imports torch."""
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


_ADAPTIVE = [False]


def adaptive() -> bool:
    """Whether trainers in this process adapt their thread count (inside :func:`adaptive_threads`)."""
    return _ADAPTIVE[-1]


@contextlib.contextmanager
def adaptive_threads(enabled: bool = True) -> Iterator[None]:
    """Within this block, trainers without a fixed ``num_threads`` run a :class:`ThreadTuner` (the thread count
    is one setting of the whole process, so the choice is too; the pipeline turns it on for ``auto``)."""
    _ADAPTIVE.append(enabled)
    try:
        yield
    finally:
        _ADAPTIVE.pop()
