"""The report: the rows' fields, their speedups and bandwidth, the table, CSV/JSON writing and the plot.

Row fields (JSON, CSV; the table shows the main ones):
  state          ok | skip (the backend cannot take the input) | OOM | OOM-skip (over the memory budget, or OOM at
                 a smaller B) | timeout (one call over --time-limit) | timeout-skip (so at a smaller B, or
                 predicted so from it: time x B^batch power of the target) | error; `note` says why
  precision      how float32 matmuls ran: highest (IEEE), tf32, bf16 (autocast); "highest" where no matmul costs
  median_ms, p20_ms, p80_ms   the timed calls' median and 20%/80% quantiles; `calls` how many
  peak_mem_mb    peak memory the call adds above what is live before it: on CUDA the max_memory_allocated delta;
                 on CPU the peak of the bytes allocated during the call and live at once, from the profiler's
                 allocation events (it cannot credit frees of older blocks, e.g. a backward freeing saved tensors)
  speedup_vs_recipe / _svd / _torch   that provider's median over this one's, same size, target and mode
  floor_bytes    bytes that must move: inputs read (again in a backward), gradients and outputs written
  gbps, copy_fraction   floor_bytes / median, and its share of copy_gbps, a measured copy of a large buffer
  auto           whether backend="auto" runs this provider's code on the cell's inputs (a baseline: never)
  device, threads, load_avg, torch, triton, python, commit, version   where and what ran ("-dirty": uncommitted
                 changes; commit None outside a git checkout, version the installed package's)
  loaded         whether the load average at the start exceeded half the CPUs: the CPU times are unreliable
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
    "target", "mode", "provider", "auto", "precision", "dtype", "B", "M", "D", "state", "note",
    "median_ms", "p20_ms", "p80_ms", "calls", "peak_mem_mb",
    "speedup_vs_recipe", "speedup_vs_svd", "speedup_vs_torch", "floor_bytes", "gbps", "copy_fraction",
    "device", "device_type", "copy_gbps", "memory_method", "timer", "threads", "load_avg", "loaded", "torch",
    "triton", "python", "commit", "version",
)


def finish_rows(rows: list[dict], meta: dict) -> list[dict]:
    """Speedups over the baselines measured in the same run, bandwidth, and the run's metadata on every row."""
    by_key = {(r["target"], r["mode"], r["precision"], r["dtype"], r["B"], r["M"], r["D"], r["provider"]): r
              for r in rows}
    for r in rows:
        key = (r["target"], r["mode"], r["precision"], r["dtype"], r["B"], r["M"], r["D"])
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


# (header, right-aligned, the cell's text from a row) of the table's columns before `state`
COLUMNS = (
    ("target", False, lambda r: r["target"]),
    ("mode", False, lambda r: r["mode"]),
    ("matmul", False, lambda r: r["precision"]),
    ("provider", False, lambda r: r["provider"] + ("*" if r.get("auto") else "")),
    ("median ms", True, lambda r: _fmt(r["median_ms"], ".4g")),
    ("p20-p80 ms", True, lambda r: "-" if r["p20_ms"] is None else f"{r['p20_ms']:.4g}-{r['p80_ms']:.4g}"),
    ("peak MB", True, lambda r: _fmt(r["peak_mem_mb"], ".3g")),
    ("x recipe", True, lambda r: _fmt(r["speedup_vs_recipe"], ".2f")),
    ("x svd", True, lambda r: _fmt(r["speedup_vs_svd"], ".2f")),
    ("x torch", True, lambda r: _fmt(r["speedup_vs_torch"], ".2f")),
    ("GB/s", True, lambda r: _fmt(r["gbps"], ".3g")),
    ("%copy", True, lambda r: _fmt(None if r["copy_fraction"] is None else 100 * r["copy_fraction"], ".0f")),
)


def _lines(rows: list[dict]) -> list[str]:
    """One size's table: each column as wide as its widest cell, two spaces between columns."""
    cells = [[text(r) for _, _, text in COLUMNS] + [r["note"] or r["state"]] for r in rows]
    head = [name for name, _, _ in COLUMNS] + ["state"]
    widths = [max(len(c[i]) for c in cells + [head]) for i in range(len(COLUMNS))]
    right = [align for _, align, _ in COLUMNS]

    def line(values):
        fields = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)]
        return "  ".join(fields + [values[-1]])

    return [line(head)] + [line(c) for c in cells]


def table(rows: list[dict]) -> str:
    """The rows grouped by size, one line per provider; * marks the provider backend="auto" picks there."""
    lines, sizes = [], {}
    for r in rows:
        sizes.setdefault((r["dtype"], r["B"], r["M"], r["D"]), []).append(r)
    for (dtype, b, m, d), group in sizes.items():
        lines += ["", f"{dtype}  B={b}  M={m}  D={d}"] + _lines(group)
    first = rows[0] if rows else {}
    ran = f"commit {first['commit']}" if first.get("commit") else f"pmrl_kernels {first.get('version')}"
    title = f"PMRL benchmark on {first.get('device')} (torch {first.get('torch')}, {ran})"
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
    measured = {r["target"] for r in ok}  # in the table's order, then targets of a --load-ed run that the table lacks
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
