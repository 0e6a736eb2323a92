"""The command line of `python -m pmrl_kernels.bench`: flags, the default grids, and main()."""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import re
import time
from pathlib import Path
from typing import Optional

import torch

from .. import backends
from . import targets
from .cells import DTYPE_ALIASES, DTYPES, MODES, PRECISIONS
from .machine import metadata
from .providers import BASE_PROVIDERS, VARIANTS, available_variants, provides
from . import summary
from .report import FIELDS, finish_rows, table, write_files
from .sweep import build_cases, memory_budget, run, warn_if_loaded
from .timing import Timer

# (dtype, B, M, D) points. The B sweep is what the plot draws and the headline reads; the side points vary M, D and
# dtype one at a time. --full on CPU: several minutes on 2 cores. CUDA: fills an H100 (Z is 512 MiB at
# B=65536, D=512, fp32). Both hold the reference case B=16384, M=4, D=256, float32.
FULL_GRID = {
    "cpu": [("float32", b, 4, 256) for b in (256, 1024, 4096, 16384)]
    + [("float32", 1024, m, 256) for m in (2, 8)]
    + [("float32", 1024, 4, d) for d in (64, 512)]
    + [("bfloat16", 1024, 4, 256)],
    "cuda": [(dt, b, 4, 512) for dt in ("float32", "bfloat16") for b in (1024, 4096, 16384, 65536)]
    + [("float32", 16384, 4, 256)]
    + [("float32", 16384, m, 512) for m in (2, 8, 16)]
    + [("float32", 16384, 4, d) for d in (128, 2048)],
}
# the default run: the B sweep, forward and backward together
DEFAULT_GRID = {
    "cpu": [("float32", b, 4, 256) for b in (256, 1024, 4096)],
    "cuda": [("float32", b, 4, 512) for b in (1024, 4096, 16384, 65536)],
}
DEFAULT_MODES = ("full",)  # --full and --quick: every mode
QUICK_GRID = [("float32", b, 4, 64) for b in (256, 1024)]
RESULTS_ROOT = "pmrl-bench-results"  # the default run writes into RESULTS_ROOT/<device>-<time>/
# what --load needs of a row; the fields a row of an older bench lacks read as LOAD_DEFAULTS, else None
REQUIRED = ("target", "mode", "provider", "dtype", "B", "M", "D", "state", "median_ms", "p20_ms", "p80_ms")
LOAD_DEFAULTS = {"precision": "highest"}
FILES = {"json": "rows.json", "csv": "rows.csv", "plot": "plot.png", "text": "report.txt"}
# providers a run takes only when --providers names them: on the CPU Triton runs in its interpreter (a correctness
# path) and torch.compile spends a minute compiling each cell
NAMED_ONLY = {"cpu": ("triton", "compiled")}
INTERRUPTED = 130  # the exit status of a run interrupted (SIGINT) after it wrote the cells it measured
TIME_LIMIT_S = 1.0  # per call; slower cells are reported as timeouts and larger B is not tried


def _names(parser, text: str, known, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        parser.error(f"--{what}: unknown {bad or text!r}; choose from {', '.join(known)}")
    return list(dict.fromkeys(names))


def parse_sizes(text: str, defaults: dict) -> dict:
    """"B=1024,4096;M=4;D=256" -> {"B": [1024, 4096], "M": [4], "D": [256]}; missing keys keep the defaults."""
    sizes = dict(defaults)
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, sep, values = part.partition("=")
        key = key.strip().upper()
        if not sep or key not in ("B", "M", "D"):
            raise ValueError(f"expected KEY=N[,N...] with KEY one of B, M, D; got {part!r}")
        try:
            sizes[key] = [int(v) for v in values.split(",")]
        except ValueError:
            raise ValueError(f"{key} takes comma-separated integers, got {values!r}") from None
        if not sizes[key] or min(sizes[key]) < (2 if key == "M" else 1):
            raise ValueError(f"{key} values must be >= {2 if key == 'M' else 1}, got {values!r}")
    return sizes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pmrl-bench",
        description="Time and memory of the PMRL loss: this package's backends against the published recipe, "
                    "torch.linalg.svd and the torch composition (eager and compiled), side by side in one run. The "
                    "default run (forward and backward together, B up to 4096) writes its table, JSON, CSV and plot into "
                    f"{RESULTS_ROOT}/<device>-<time>/. Same as `python -m pmrl_kernels.bench`.",
        epilog='example: pmrl-bench --sizes "B=1024,4096;M=4;D=256" --targets align,gram_svd --modes full '
               "--out my-results",
    )
    p.add_argument("--sizes", help='grid "B=..;M=..;D=.." (comma lists; a missing key keeps the default sweep\'s B '
                                   "values or M=4, D=256 on CPU / D=512 on CUDA)")
    p.add_argument("--providers", help="comma list (default: all that run here, but triton and compiled on CPU): "
                   + ", ".join(list(BASE_PROVIDERS) + list(backends.REGISTRY) + list(VARIANTS)))
    p.add_argument("--targets", default=",".join(targets.TARGETS),
                   help=f"comma list of {', '.join(targets.TARGETS)}")
    p.add_argument("--modes", help=f"comma list of {', '.join(MODES)} (default: full; every mode with --full "
                                   "or --quick)")
    p.add_argument("--precisions", help=f"comma list of {', '.join(PRECISIONS)}: how the float32 matmuls of the "
                                        "loss and contrastive targets run (IEEE, TF32, bfloat16 autocast; default: "
                                        "all three on CUDA, highest on CPU)")
    p.add_argument("--dtype", help=f"comma list of {', '.join(DTYPES)} (or fp32, bf16, fp16, fp64) for every size "
                                   "(default: the sweep's own; float32 with --sizes)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="a few small sizes, 3 timed calls: a smoke run")
    p.add_argument("--full", action="store_true", help="every mode, and on CPU also B = 16384, M = 2, 8, D = 64, 512 "
                                                       "and bfloat16 (over 10 minutes on 2 CPU cores)")
    p.add_argument("--repeats", type=int, help="timed calls per cell at most (default 10 CPU, 25 CUDA; 3 quick)")
    p.add_argument("--time-limit", type=float, default=TIME_LIMIT_S, help="seconds a call may take (default 1)")
    p.add_argument("--mem-budget", type=float, help="GiB a cell may use (default: a third of free RAM on CPU, "
                                                   "90%% of free GPU memory)")
    p.add_argument("--out", metavar="DIR", help=f"folder for {', '.join(FILES.values())} (default: a new folder "
                                                "named after the device and the time under ./" + RESULTS_ROOT + ")")
    p.add_argument("--no-save", action="store_true", help="write no files, only print (explicit paths below "
                                                          "are still written)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list here")
    p.add_argument("--csv", metavar="PATH", help="also write the rows as CSV here")
    p.add_argument("--plot", metavar="PATH", help="also write a PNG of time vs B here (needs matplotlib: the "
                                                  "bench extra)")
    p.add_argument("--load", metavar="PATH", help="measure nothing: print (and write where asked) the rows of an "
                                                  "earlier run's JSON")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _grid(args, parser, device_type: str) -> list[tuple]:
    default = QUICK_GRID if args.quick else (FULL_GRID if args.full else DEFAULT_GRID)[device_type]
    dtypes = None
    if args.dtype:
        known = list(DTYPES) + list(DTYPE_ALIASES)
        dtypes = [DTYPE_ALIASES.get(n, n) for n in _names(parser, args.dtype, known, "dtype")]
    if args.sizes:
        swept = [p for p in default if p[2:] == default[0][2:]]
        try:
            sizes = parse_sizes(args.sizes, {"B": [p[1] for p in swept], "M": [default[0][2]], "D": [default[0][3]]})
        except ValueError as err:
            parser.error(f"--sizes: {err}")
        default = [(default[0][0], b, m, d) for b, m, d in itertools.product(sizes["B"], sizes["M"], sizes["D"])]
    if dtypes:
        default = [(dt,) + p[1:] for dt in dtypes for p in default]
    return list(dict.fromkeys(default))


def main(argv: Optional[list[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.plot and importlib.util.find_spec("matplotlib") is None:  # fail before the sweep, not after it
        parser.error("--plot needs matplotlib: pip install 'pmrl_kernels[bench]'")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out: {args.out} exists and is not a folder")
    if args.load:
        try:
            with open(args.load) as f:
                rows = json.load(f)
        except (OSError, ValueError) as err:
            parser.error(f"--load: cannot read {args.load}: {err}")
        if not isinstance(rows, list) or not all(isinstance(r, dict) and set(REQUIRED) <= set(r) for r in rows):
            parser.error(f"--load: {args.load} is not the --json output of this bench")
        rows = [{f: {**LOAD_DEFAULTS, **r}.get(f) for f in FIELDS} for r in rows]
        _finish(args, rows, None, save_by_default=False)
        return 0
    if args.quick and args.full:
        parser.error("--quick and --full exclude each other: choose one")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.time_limit <= 0 or (args.mem_budget is not None and args.mem_budget <= 0):
        parser.error("--time-limit and --mem-budget must be > 0")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 25 if device.type == "cuda" else 10)

    here = list(BASE_PROVIDERS) + backends.available_backends(device.type) + available_variants(device.type)
    if args.providers:
        providers = _names(parser, args.providers, list(BASE_PROVIDERS) + list(backends.REGISTRY) + list(VARIANTS),
                           "providers")
        missing = [p for p in providers if p not in here]
        if missing:
            parser.error(f"--providers: {missing} not available on {device.type} here; "
                         f"available: {', '.join(here)}")
    else:
        providers = [p for p in here if p not in NAMED_ONLY.get(device.type, ())]
    target_names = _names(parser, args.targets, list(targets.TARGETS), "targets")
    if args.modes is None:
        args.modes = ",".join(MODES if args.full or args.quick else DEFAULT_MODES)
    modes = _names(parser, args.modes, MODES, "modes")
    grid = _grid(args, parser, device.type)
    default_precisions = PRECISIONS if device.type == "cuda" else ("highest",)
    precisions = _names(parser, args.precisions or ",".join(default_precisions), PRECISIONS, "precisions")

    timer = Timer(device)
    meta = metadata(device, timer)
    warn_if_loaded(meta)
    cases = build_cases(grid, target_names, modes, providers, device.type, precisions)
    if not cases:
        computes = "; ".join(
            f"{p} computes "
            + (", ".join(t for t in targets.TARGETS if provides(targets.TARGETS[t], p, device.type)) or "nothing")
            for p in providers
        )
        parser.error(f"no provider computes the chosen targets ({computes})")
    t0 = time.perf_counter()
    rows = run(cases, device, timer, repeats=repeats, time_limit=args.time_limit,
               budget_bytes=memory_budget(device, args.mem_budget), progress=not args.no_progress)
    _finish(args, finish_rows(rows, meta), time.perf_counter() - t0, save_by_default=True)
    return 0 if len(rows) == len(cases) else INTERRUPTED


def results_folder(device: str, when: Optional[time.struct_time] = None) -> Path:
    """RESULTS_ROOT/<device>-<time>: "AMD EPYC 7B13 (2 CPUs)" -> amd-epyc-7b13-2-cpus-20261130-141502."""
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "device"
    return Path(RESULTS_ROOT) / f"{slug}-{time.strftime('%Y%m%d-%H%M%S', when or time.localtime())}"


def _finish(args, rows: list[dict], seconds: Optional[float], save_by_default: bool) -> None:
    """Print the table, the legend, the outcome and the headline; write the files; say where they went."""
    parts = [table(rows), summary.legend(list(dict.fromkeys(r["provider"] for r in rows)))]
    if seconds is not None:
        parts.append(summary.outcome(rows, seconds))
    parts.append(summary.headline(rows))
    text = "\n\n".join(parts)
    print(text)
    paths = {kind: getattr(args, kind) for kind in ("json", "csv", "plot") if getattr(args, kind)}
    if not args.no_save and (args.out or save_by_default):
        folder = Path(args.out) if args.out else results_folder(rows[0]["device"] if rows else "device")
        folder.mkdir(parents=True, exist_ok=True)
        for kind, name in FILES.items():
            if kind == "plot" and importlib.util.find_spec("matplotlib") is None:
                print("\nNo plot was drawn: matplotlib is not installed (pip install 'pmrl_kernels[bench]').")
                continue
            paths.setdefault(kind, str(folder / name))
    if "plot" in paths and not any(r["state"] == "ok" for r in rows):
        print("\nNo plot was drawn: no cell was measured.")
        del paths["plot"]
    written = [Path(p) for p in write_files(rows, text, paths)]
    by_folder = {}
    for path in written:
        by_folder.setdefault(path.parent, []).append(path.name)
    for folder, names in by_folder.items():
        print(f"\nWrote {', '.join(names)} into {folder}{os.sep}.")


