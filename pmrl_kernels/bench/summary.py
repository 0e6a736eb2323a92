"""What a run prints after its table: the legend of providers and columns, a count of the cells by outcome, and
the headline: the speed-ups of the backends backend="auto" picks over each baseline, at the largest size where
both cells have a tight spread, or none on a loaded machine."""
from __future__ import annotations

import textwrap
from collections import Counter

from .. import backends
from .providers import BASELINES, VARIANTS

BASELINE_NAMES = {
    "recipe": "the published recipe",
    "svd": "torch.linalg.svd",
    "svdvals": "torch.linalg.svdvals",
    "torch": "the torch composition",
}
PROVIDER_LEGEND = {
    "recipe": "the published PMRL code: torch.linalg.svd(full_matrices=True) of every instance, with autograd",
    "svd": "torch.linalg.svd(full_matrices=False), the reduced SVD (16384 instances a call), with autograd",
    "svdvals": "torch.linalg.svdvals, singular values only (so the alignment term only), with autograd",
    "torch": "the Gram matrix by bmm, torch.linalg.eigh (16384 instances a call), F.cross_entropy, with autograd",
    "compiled": "the torch composition under torch.compile (compiled in an untimed first call)",
    "reference": "this package's pure-PyTorch backend, the float64 oracle and the fallback",
    "cpp": "this package's C++ kernels (CPU), with their hand-written backward",
    "cuda": "this package's CUDA kernels, with their hand-written backward",
    "blocked": "this package's contrastive term on torch's matmul in row blocks (the other op as backend='auto')",
    "triton": "this package's Triton kernels (on the CPU through Triton's interpreter: a correctness path only)",
}
LEGEND = """Providers:
{providers}
Targets: loss is the whole PMRL loss (alignment + contrastive term), align the alignment term alone, gram_svd the
  singular values and leading directions, contrastive the contrastive term on given leading directions.
Modes: forward; backward (the backward alone, after an untimed forward); full (forward and backward).
Columns:
  provider               * marks the backend that backend='auto' runs on these inputs (the headline's)
  matmul                 how float32 matmuls ran: highest (IEEE), tf32, bf16 (autocast)
  median ms, p20-p80 ms  the median time of a call and its 20% and 80% quantiles, over the timed calls
  peak MB                the extra memory a call takes at its peak
  x recipe, x svd, x torch  how many times faster than that provider on the same cell this row is (above 1: faster)
  GB/s                   the bytes a call must move at least (inputs read, outputs and gradients written) per second
  %copy                  that rate as a share of a measured large memory copy here: 100% is the bandwidth bound
  state                  ok, or why the cell has no time (timed out, out of memory, not run, failed)"""
HEADLINE_TARGETS = {"loss": "the whole loss", "align": "the alignment term", "gram_svd": "gram_svd"}
HEADLINE_MODE = "full"
TIGHT_SPREAD = 1.5  # p80 / p20 under this: the cell's calls agree well enough to quote its median
WIDTH = 118


def legend(provider_names: list[str]) -> str:
    names = [p for p in PROVIDER_LEGEND if p in provider_names]
    names += [p for p in provider_names if p not in PROVIDER_LEGEND]
    width = max((len(p) for p in names), default=0)
    known = {**PROVIDER_LEGEND, **{name: v.legend for name, v in VARIANTS.items()}}
    lines = [f"  {p:<{width}}  {known.get(p, 'a registered backend')}" for p in names]
    return LEGEND.format(providers="\n".join(lines))


def outcome(rows: list[dict], seconds: float) -> str:
    counts = Counter(r["state"] for r in rows)
    parts = [f"{counts.pop('ok', 0)} measured"] + [f"{n} {state}" for state, n in sorted(counts.items())]
    return f"{len(rows)} cells in {seconds:.0f} s: {', '.join(parts)}."


def tight(row: dict) -> bool:
    """A measured cell whose timed calls agree: p80 / p20 under TIGHT_SPREAD."""
    return row["state"] == "ok" and row["p80_ms"] < TIGHT_SPREAD * row["p20_ms"]


def _ours(rows: list[dict]) -> list[dict]:
    """The cells of the backends backend="auto" picks on that device for those inputs."""
    return [r for r in rows if r["provider"] in backends.REGISTRY and r.get("auto") and r["state"] == "ok"]


def _comparison(rows: list[dict], target: str, series: tuple, baseline: str) -> str:
    """The package against `baseline` on `target` at the largest B of `series` where both have a tight cell, or
    why there is no such B."""
    cells = {}
    for r in rows:
        if (r["target"], r["mode"], r["precision"], r["dtype"], r["M"], r["D"]) == (target, HEADLINE_MODE,
                                                                                      "highest", *series):
            cells.setdefault(r["B"], []).append(r)
    name = BASELINE_NAMES[baseline]
    both_ran = False
    for b in sorted(cells, reverse=True):
        base = [r for r in cells[b] if r["provider"] == baseline and r["state"] == "ok"]
        ours = _ours(cells[b])
        both_ran = both_ran or bool(base and ours)
        base, ours = [r for r in base if tight(r)], [r for r in ours if tight(r)]
        if base and ours:
            best = min(ours, key=lambda r: r["median_ms"])
            speedup = base[0]["median_ms"] / best["median_ms"]
            ratio = (f"{speedup:.1f}x faster than" if speedup >= 1.05 else f"{1 / speedup:.1f}x slower than"
                     if speedup <= 1 / 1.05 else "about as fast as")
            return f"{ratio} {name} (B={b}, {best['provider']})"
    if both_ran:
        return f"against {name} no size had both cells' p80/p20 under {TIGHT_SPREAD:g}"
    states = {r["state"] for b in cells for r in cells[b] if r["provider"] == baseline}
    if states & {"timeout", "timeout-skip"}:
        return f"{name} did not finish a call within the time limit at any size"
    return f"{name} was not measured" if not states else f"{name} did not run ({', '.join(sorted(states))})"


def headline(rows: list[dict]) -> str:
    """Speed-ups of the backends "auto" picks over each baseline, forward and backward, on the series the run swept
    over B, from cells with a tight spread only; none when the machine was loaded."""
    loaded = [r for r in rows if r.get("loaded")]
    if loaded:
        return textwrap.fill(f"Headline: none. The load average was {loaded[0]['load_avg']:.1f} at the start, over "
                             "half the CPUs, so these figures are unreliable; rerun on an idle machine.", WIDTH)
    swept = Counter((r["dtype"], r["M"], r["D"]) for r in rows if r["mode"] == HEADLINE_MODE)
    if not swept or not _ours(rows):
        return "Headline: no cell of a backend that backend='auto' picks here, so there is nothing to compare."
    series = swept.most_common(1)[0][0]
    lines = [textwrap.fill(f"Headline: backend='auto' against each baseline, forward and backward, {series[0]}, "
                           f"M={series[1]}, D={series[2]}, at the largest B where both ran with p80/p20 under "
                           f"{TIGHT_SPREAD:g}:", WIDTH)]
    for target, name in HEADLINE_TARGETS.items():
        if any(r["target"] == target for r in rows):
            said = "; ".join(_comparison(rows, target, series, baseline) for baseline in BASELINES)
            lines.append(textwrap.fill(f"{name}: {said}.", WIDTH, initial_indent="  ", subsequent_indent="    "))
    return "\n".join(lines)
