"""Timing and memory of one cell, alike for every provider: the Timer (perf_counter on CPU, CUDA events with the
L2 flushed on GPU), the CPU profiler plumbing that measures peak memory, quantiles, and `measure`, which turns
one cell into its timing row or the state (timeout, OOM, error) that stopped it.

Each cell: on CUDA (and for a provider that compiles) one cold warm-up call; one warm-up call that measures peak
extra memory and estimates the time; then up to `repeats` timed calls (fewer for slow cells, never under 3).
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time

import torch
from torch._C._profiler import _EventType

CELL_BUDGET_S = 0.5  # timed calls per cell stop at about this much time (at least 3 calls)

# what the profiler itself logs on fd 2: kineto's start/stop lines, and c10's note on freeing blocks allocated
# before profiling began (expected: a backward frees the tensors its forward saved)
_PROFILER_NOISE = re.compile(r"SyncActivityProfilerHandler|Memory block of unknown size")


@contextlib.contextmanager
def _without_profiler_noise():
    """Pass file descriptor 2 through, minus the profiler's own lines, which would garble the progress bar."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines(keepends=True):
                if not _PROFILER_NOISE.search(line):
                    sys.stderr.write(line)


def _peak_allocated(nodes) -> int:
    """Peak bytes live at once among those allocated during a profile, from its allocation events (each carries
    the running total of the blocks the profiler knows). Frees of blocks allocated before it are not seen."""
    events, stack = [], list(nodes)
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
        stack.extend(node.children)
    if not events:
        return 0
    events.sort()
    return max(total for _, _, total in events) - (events[0][2] - events[0][1])


class Timer:
    """Times calls alike for every provider: perf_counter on CPU, CUDA events on GPU (L2 flushed before each)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        # do_bench's rule: overwrite 256 MB before each timed call so no call starts with a warm L2
        self._flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if self.cuda else None
        if self.cuda:
            self.timer = "CUDA events, L2 flushed before each call"
            self.memory_method = "torch.cuda.max_memory_allocated() delta over one call"
        else:
            self.timer = "time.perf_counter"
            # torch's CPU allocator keeps no statistics, tracemalloc does not see it and the process's RSS hides
            # memory that glibc reuses: the profiler's allocation events give the exact running total
            self.memory_method = (
                "peak of the bytes torch allocates during one call and holds at once (profiler allocation "
                "events; blocks freed that were allocated before the call and BLAS/LAPACK-internal buffers unseen)"
            )

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def _clock(self, fn, arg) -> float:
        t0 = time.perf_counter()
        fn(arg)
        self.sync()
        return time.perf_counter() - t0

    def once(self, setup, fn) -> tuple[float, int]:
        """Seconds (host clock, synchronised) and peak extra bytes of one call."""
        arg = setup()
        self.sync()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            seconds = self._clock(fn, arg)
            return seconds, torch.cuda.max_memory_allocated(self.device) - base
        with _without_profiler_noise(), torch.autograd.profiler.profile(profile_memory=True) as prof:
            seconds = self._clock(fn, arg)
        return seconds, _peak_allocated(prof.kineto_results.experimental_event_tree())

    def repeat(self, setup, fn, n: int) -> list[float]:
        """Seconds of each of n calls."""
        if not self.cuda:
            times = []
            for _ in range(n):
                arg = setup()
                t0 = time.perf_counter()
                fn(arg)
                times.append(time.perf_counter() - t0)
            return times
        events = []
        for _ in range(n):
            arg = setup()
            self._flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(arg)
            end.record()
            events.append((start, end))
        self.sync()
        return [s.elapsed_time(e) / 1e3 for s, e in events]

    def copy_gbps(self) -> float:
        """Measured copy bandwidth (read + write bytes / s) of a buffer far larger than any cache."""
        nbytes = (1024 if self.cuda else 256) * 2**20
        src = torch.ones(nbytes // 4, device=self.device)
        dst = torch.empty_like(src)
        times = self.repeat(lambda: None, lambda _: dst.copy_(src), 10)
        return 2 * nbytes / quantiles(times)[0] / 1e9


def quantiles(times: list[float]) -> tuple[float, float, float]:
    """Median, 20% and 80% quantiles."""
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return tuple(q.tolist())


def _is_oom(err: BaseException) -> bool:
    text = str(err).lower()  # CPU: "DefaultCPUAllocator: not enough memory", "can't allocate memory"
    return isinstance(err, (torch.OutOfMemoryError, MemoryError)) or ("alloc" in text and "memory" in text)


def measure(setup, fn, timer: Timer, repeats: int, time_limit: float, cold: bool = False) -> dict:
    """Timing and memory of one cell, or the state that stopped it; cold: fn compiles on its first call, on
    every device."""
    try:
        if timer.cuda or cold:
            timer.once(setup, fn)  # cold: JIT compilation, autotuning, library handles, allocator growth
        seconds, peak = timer.once(setup, fn)  # on CPU this is the warm-up: nothing there compiles on first use
        if seconds > time_limit:
            return {"state": "timeout", "note": f"Timed out: one call took {seconds:.2g} s, over the {time_limit:g} s "
                                                "limit."}
        calls = max(min(3, repeats), min(repeats, int(CELL_BUDGET_S / max(seconds, 1e-9))))
        median, p20, p80 = quantiles(timer.repeat(setup, fn, calls))
    except Exception as err:  # noqa: BLE001 -- one failing provider must not stop the sweep
        first_line = str(err).splitlines()[0][:200].rstrip(".") if str(err) else type(err).__name__
        failure = {"state": "OOM", "note": f"Out of memory: {first_line}."} if _is_oom(err) else {
            "state": "error", "note": f"Failed with {type(err).__name__}: {first_line}."}
    else:
        return {
            "state": "ok", "median_ms": median * 1e3, "p20_ms": p20 * 1e3, "p80_ms": p80 * 1e3, "calls": calls,
            "peak_mem_mb": max(peak, 0) / 2**20,
        }
    if timer.cuda:
        # only now, with the exception and the tensors its frames held gone, are their cached blocks free
        torch.cuda.empty_cache()
    return failure
