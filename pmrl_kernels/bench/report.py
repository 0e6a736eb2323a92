"""The report: the rows' fields, their speedups and bandwidth, the table, CSV/JSON writing and the plot.

Row fields (JSON, CSV; the table shows the main ones):
  state          ok | skip (the backend cannot take the input) | OOM | OOM-skip (over the memory budget, or OOM at
                 a smaller B) | timeout (one call over --time-limit) | timeout-skip (so at a smaller B, or
                 predicted so from it: time x B^batch power of the target) | error; `note` says why
  median_ms, p20_ms, p80_ms   the timed calls' median and 20%/80% quantiles; `calls` how many
  peak_mem_mb    peak memory the call adds above what is live before it: on CUDA the max_memory_allocated delta;
                 on CPU the peak of the bytes allocated during the call and live at once, from the profiler's
                 allocation events (it cannot credit frees of older blocks, e.g. a backward freeing saved tensors)
  speedup_vs_recipe / _svd / _torch   that provider's median over this one's, same size, target and mode
  floor_bytes    bytes that must move: inputs read (again in a backward), gradients and outputs written
  gbps, copy_fraction   floor_bytes / median, and its share of copy_gbps, a measured copy of a large buffer
  device, threads, load_avg, torch, triton, python, commit   where and what ran ("-dirty": uncommitted changes)
"""
from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

from . import targets
from .cells import MODES, Case
from .providers import BASELINES

FIELDS = (
    "target", "mode", "provider", "dtype", "B", "M", "D", "state", "note",
    "median_ms", "p20_ms", "p80_ms", "calls", "peak_mem_mb",
    "speedup_vs_recipe", "speedup_vs_svd", "speedup_vs_torch", "floor_bytes", "gbps", "copy_fraction",
    "device", "device_type", "copy_gbps", "memory_method", "timer", "threads", "load_avg", "torch", "triton", "python",
    "commit",
)


def finish_rows(rows: list[dict], meta: dict) -> list[dict]:
    """Speedups over the baselines measured in the same run, bandwidth, and the run's metadata on every row."""
    by_key = {(r["target"], r["mode"], r["dtype"], r["B"], r["M"], r["D"], r["provider"]): r for r in rows}
    for r in rows:
        key = (r["target"], r["mode"], r["dtype"], r["B"], r["M"], r["D"])
        target = targets.TARGETS[r["target"]]
        for base in BASELINES:
            ref = by_key.get(key + (target.measured_as.get(base, base),))
            ok = r["state"] == "ok" and ref is not None and ref["state"] == "ok"
            r[f"speedup_vs_{base}"] = ref["median_ms"] / r["median_ms"] if ok else None
        r["floor_bytes"] = targets.floor_bytes(Case(**{k: r[k] for k in Case.__dataclass_fields__}))
        r["gbps"] = r["floor_bytes"] / r["median_ms"] / 1e6 if r["state"] == "ok" else None
        r["copy_fraction"] = r["gbps"] / meta["copy_gbps"] if r["gbps"] is not None else None
        r.update(meta)
    return [{f: r.get(f) for f in FIELDS} for r in rows]


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    """The rows grouped by size, one line per provider."""
    head = f"{'target':<12}{'mode':<9}{'provider':<10}{'median ms':>11}{'p20-p80 ms':>20}{'peak MB':>10}" \
           f"{'x recipe':>10}{'x svd':>8}{'x torch':>9}{'GB/s':>8}{'%copy':>7}  state"
    lines, size = [], None
    for r in rows:
        if (r["dtype"], r["B"], r["M"], r["D"]) != size:
            size = (r["dtype"], r["B"], r["M"], r["D"])
            lines += ["", f"{r['dtype']}  B={r['B']}  M={r['M']}  D={r['D']}", head]
        spread = "-" if r["p20_ms"] is None else f"{r['p20_ms']:.4g}-{r['p80_ms']:.4g}"
        frac = None if r["copy_fraction"] is None else 100 * r["copy_fraction"]
        state = r["note"] or r["state"]  # a sentence that names the state
        lines.append(
            f"{r['target']:<12}{r['mode']:<9}{r['provider']:<10}{_fmt(r['median_ms'], '.4g'):>11}{spread:>20}"
            f"{_fmt(r['peak_mem_mb'], '.3g'):>10}{_fmt(r['speedup_vs_recipe'], '.2f'):>10}"
            f"{_fmt(r['speedup_vs_svd'], '.2f'):>8}{_fmt(r['speedup_vs_torch'], '.2f'):>9}"
            f"{_fmt(r['gbps'], '.3g'):>8}{_fmt(frac, '.0f'):>7}  {state}"
        )
    first = rows[0] if rows else {}
    title = f"PMRL benchmark on {first.get('device')} (torch {first.get('torch')}, commit {first.get('commit')})"
    notes = f"memory: {first.get('memory_method')}; timer: {first.get('timer')}; " \
            f"copy bandwidth {_fmt(first.get('copy_gbps'), '.1f')} GB/s; {first.get('threads')} threads, " \
            f"load average {_fmt(first.get('load_avg'), '.1f')} at the start"
    return "\n".join([title, notes] + lines)


def write_csv(rows: list[dict], path: str):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path: str):
    """PNG: time vs B per provider (log-log), one panel per target and mode, for every (dtype, M, D) that was
    measured at two or more B."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["state"] == "ok"]
    groups = sorted({(r["dtype"], r["M"], r["D"]) for r in ok})
    swept = [g for g in groups if len({r["B"] for r in ok if (r["dtype"], r["M"], r["D"]) == g}) > 1] or groups
    measured = {r["target"] for r in ok}  # in the table's order; a loaded run may hold targets it no longer has
    shown = [t for t in dict.fromkeys([*targets.TARGETS, *sorted(measured)]) if t in measured]
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    if not shown:
        raise ValueError("nothing to plot: no cell ran")
    fig, axes = plt.subplots(len(shown), len(modes), figsize=(4.5 * len(modes), 3.4 * len(shown)),
                             squeeze=False)
    styles = dict(zip(swept, itertools.cycle(["-", "--", ":", "-."])))
    colors = {p: f"C{i}" for i, p in enumerate(dict.fromkeys(r["provider"] for r in ok))}  # same in every panel
    batches = sorted({r["B"] for r in ok if (r["dtype"], r["M"], r["D"]) in swept})
    for (i, target), (j, mode) in itertools.product(enumerate(shown), enumerate(modes)):
        ax = axes[i][j]
        for group, provider in itertools.product(swept, colors):
            pts = sorted((r["B"], r["median_ms"]) for r in ok if (r["target"], r["mode"], r["provider"]) ==
                         (target, mode, provider) and (r["dtype"], r["M"], r["D"]) == group)
            if pts:
                label = provider if len(swept) == 1 else f"{provider} {group[0]} M={group[1]} D={group[2]}"
                ax.plot(*zip(*pts), styles[group], color=colors[provider], marker="o", label=label)
        ax.set(xscale="log", yscale="log", title=f"{target} - {mode}", xlabel="B", ylabel="median ms")
        ax.set_xticks(batches, [str(b) for b in batches])  # the measured B, not log-scale minor labels
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    sizes = "" if len(swept) > 1 else f", {swept[0][0]} M={swept[0][1]} D={swept[0][2]}"
    fig.suptitle(f"PMRL on {ok[0]['device']}{sizes}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_files(rows: list[dict], text: str, paths: dict[str, str]) -> list[str]:
    """Write each of {"json", "csv", "plot", "text"} that has a path; return the paths written."""
    writers = {
        "json": lambda path: Path(path).write_text(json.dumps(rows, indent=1)),
        "csv": lambda path: write_csv(rows, path),
        "plot": lambda path: plot(rows, path),
        "text": lambda path: Path(path).write_text(text + "\n"),
    }
    for kind, path in paths.items():
        writers[kind](path)
    return list(paths.values())
