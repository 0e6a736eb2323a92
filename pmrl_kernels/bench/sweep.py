"""The sweep: the cases of a grid in the order they run, and the scheduler that runs them one by one, with the
progress bar, the memory budget, and the skip of larger B once a smaller B timed out or ran out of memory (or
its time, scaled by the target's batch power, predicts that it would)."""
from __future__ import annotations

import itertools
import os
import re
import sys
from dataclasses import asdict
from typing import Optional

import torch

from . import providers, targets
from .cells import Case, Skip, callables, make_inputs, matmul_precision
from .timing import Timer, measure


# a series that hit one of these at some B is not run at larger B (the note says which B)
LIMITS = {"OOM": "ran out of memory", "OOM-skip": "would run out of memory", "timeout": "timed out",
          "timeout-skip": "would time out"}


def build_cases(grid, target_names, modes, provider_names, device_type: str,
                precisions=("highest",)) -> list[Case]:
    """Cases in the order they run: the grid's (dtype, M, D) series in the order given, each by ascending B
    (timeouts and OOM at small B rule out larger B), then every provider of one (size, target, mode, precision) side
    by side. Targets whose cost is a matmul run in each of `precisions`, the others at "highest"."""
    series = {}
    for dtype, _, m, d in grid:
        series.setdefault((dtype, m, d), len(series))
    cases = []
    for dtype, b, m, d in sorted(set(grid), key=lambda p: (series[(p[0], p[2], p[3])], p[1])):
        for name, mode in itertools.product(target_names, modes):
            target = targets.TARGETS[name]
            names = providers.providers_for(target, provider_names, device_type)
            for precision in precisions if target.matmul else ("highest",):
                cases += [Case(name, p, mode, dtype, b, m, d, precision) for p in names]
    return cases


def prepare(case: Case, inputs: dict, budget_bytes: int):
    """(setup, fn) of the case, or Skip."""
    target = targets.TARGETS[case.target]
    plan = providers.plan(target, case, inputs)
    if plan.need_bytes > budget_bytes:
        raise Skip("OOM-skip", f"Not run: it needs at least {plan.need_bytes / 2**30:.2g} GiB, over the "
                               f"{budget_bytes / 2**30:.2g} GiB budget.")
    if plan.refusal is not None:
        raise Skip("skip", f"Not run: {plan.refusal.rstrip('.')}.")
    return callables(plan.forward, inputs[target.takes], case.mode)


def memory_budget(device: torch.device, gib: Optional[float] = None) -> int:
    """Bytes a cell may use: `gib` when given, else 90% of the free GPU memory or a third of the free RAM
    (the CPU is shared with whatever else runs)."""
    if gib is not None:
        return int(gib * 2**30)
    if device.type == "cuda":
        return int(0.9 * torch.cuda.mem_get_info(device)[0])
    try:
        return _proc_meminfo_available() // 3
    except OSError:
        return 4 * 2**30


def _proc_meminfo_available() -> int:
    with open("/proc/meminfo") as f:
        return int(re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def warn_if_loaded(meta: dict) -> None:
    if meta["loaded"]:
        print(f"Warning: the load average is {meta['load_avg']:.1f} on {os.cpu_count()} CPUs, so the CPU timings "
              "will be unreliable.", file=sys.stderr)


class Progress:
    """tqdm when installed, else a counter on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.bar = None
        if tqdm is not None and enabled:
            self.bar = tqdm(total=total, unit="cell", file=sys.stderr, dynamic_ncols=True, mininterval=0.5)

    def start(self, label: str):
        if self.bar is not None:
            self.bar.set_description(label)
        elif self.enabled:
            print(f"\r[{self.done + 1}/{self.total}] {label:<60}", end="", file=sys.stderr, flush=True)

    def step(self):
        self.done += 1
        if self.bar is not None:
            self.bar.update()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def run(cases: list[Case], device: torch.device, timer: Timer, *, repeats: int,
        time_limit: float, budget_bytes: int, progress: bool = True) -> list[dict]:
    """One row per case, or per case run before an interrupt. A timeout or OOM at some B marks the same cell at
    larger B, and so does a time predicted over the limit (scaled by B to the target's batch power)."""
    rows, inputs, inputs_key, history = [], None, None, {}  # history: the series' last cell that ran or failed
    bar = Progress(len(cases), progress)
    try:
        for case in cases:
            bar.start(f"{case.target} {case.mode} {case.provider} {case.precision} {case.dtype} B={case.B} "
                      f"M={case.M} D={case.D}")
            size_key = (case.dtype, case.B, case.M, case.D)
            if size_key != inputs_key:
                inputs, inputs_key = None, size_key  # free the previous size first
                inputs = make_inputs(*size_key, device=device)
            series = (case.target, case.provider, case.mode, case.precision, case.dtype, case.M, case.D)
            previous = history.get(series)
            inherited = previous is not None and previous["state"] in LIMITS
            try:
                if inherited:
                    raise Skip(previous["state"].split("-")[0] + "-skip",
                               f"Not run: it {LIMITS[previous['state']]} at B={previous['B']}.")
                if previous is not None and previous["state"] == "ok":
                    power = targets.TARGETS[case.target].batch_power
                    predicted = previous["median_ms"] / 1e3 * (case.B / previous["B"]) ** power
                    if predicted > time_limit:
                        raise Skip("timeout-skip", f"Not run: B={previous['B']} predicts {predicted:.2g} s a call "
                                                   f"here, over the {time_limit:g} s limit.")
                setup, fn = prepare(case, inputs, budget_bytes)
                with matmul_precision(case.precision, device.type), providers.knobs(case.provider):
                    result = measure(setup, fn, timer, repeats, time_limit,
                                     cold=case.provider in providers.COMPILING)
            except Skip as skip:
                result = {"state": skip.args[0], "note": skip.args[1]}
            auto = providers.auto_choice(targets.TARGETS[case.target], case.provider, inputs)
            row = {**asdict(case), "auto": auto, **result}
            if not inherited:
                history[series] = row
            rows.append(row)
            bar.step()
    except KeyboardInterrupt:  # Ctrl-C, or `timeout -s INT`: the cells measured so far are still reported
        print(f"\nInterrupted after {len(rows)} of {len(cases)} cells.", file=sys.stderr)
    bar.close()
    return rows

