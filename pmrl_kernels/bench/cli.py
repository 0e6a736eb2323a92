"""The command line of `python -m pmrl_kernels.bench`: flags, the default grids, and main()."""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
import time
from typing import Optional

import torch

from .. import backends
from . import targets
from .cells import DTYPE_ALIASES, DTYPES, MODES
from .machine import metadata
from .providers import BASE_PROVIDERS, provides
from .report import FIELDS, emit, finish_rows
from .sweep import build_cases, memory_budget, run, warn_if_loaded
from .timing import Timer

# (dtype, B, M, D) points. The B sweep is what --plot draws; the side points vary M, D and dtype one at a time.
# CPU: about 2 minutes on 2 idle cores. CUDA: fills an H100 (Z is 512 MiB at B=65536, D=512, fp32).
# Both hold the issue-3 reference case B=16384, M=4, D=256, float32.
DEFAULT_GRID = {
    "cpu": [("float32", b, 4, 256) for b in (256, 1024, 4096, 16384)]
    + [("float32", 1024, m, 256) for m in (2, 8)]
    + [("float32", 1024, 4, d) for d in (64, 512)]
    + [("bfloat16", 1024, 4, 256)],
    "cuda": [(dt, b, 4, 512) for dt in ("float32", "bfloat16") for b in (1024, 4096, 16384, 65536)]
    + [("float32", 16384, 4, 256)]
    + [("float32", 16384, m, 512) for m in (2, 8, 16)]
    + [("float32", 16384, 4, d) for d in (128, 2048)],
}
QUICK_GRID = [("float32", b, 4, 64) for b in (256, 1024)]
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
        prog="python -m pmrl_kernels.bench",
        description="Time and memory of the PMRL loss: kernel backends vs the published recipe and torch.",
        epilog='example: python -m pmrl_kernels.bench --sizes "B=1024,4096;M=4;D=256" --targets align,gram_svd '
               "--modes full --json cpu.json --csv cpu.csv --plot cpu.png",
    )
    p.add_argument("--sizes", help='grid "B=..;M=..;D=.." (comma lists; a missing key keeps the default sweep\'s B '
                                   "values or M=4, D=256 on CPU / D=512 on CUDA)")
    p.add_argument("--providers", help="comma list (default: all that run here): "
                   + ", ".join(list(BASE_PROVIDERS) + list(backends.REGISTRY)))
    p.add_argument("--targets", default=",".join(targets.TARGETS),
                   help=f"comma list of {', '.join(targets.TARGETS)}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--dtype", help=f"comma list of {', '.join(DTYPES)} (or fp32, bf16, fp16, fp64) for every size "
                                   "(default: the sweep's own; float32 with --sizes)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--quick", action="store_true", help="a few small sizes, 3 timed calls: a smoke run")
    p.add_argument("--repeats", type=int, help="timed calls per cell at most (default 10 CPU, 25 CUDA; 3 quick)")
    p.add_argument("--time-limit", type=float, default=TIME_LIMIT_S, help="seconds a call may take (default 1)")
    p.add_argument("--mem-budget", type=float, help="GiB a cell may use (default: a third of free RAM on CPU, "
                                                   "90%% of free GPU memory)")
    p.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    p.add_argument("--csv", metavar="PATH", help="write the rows as CSV")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of time vs B (needs matplotlib: the bench extra)")
    p.add_argument("--load", metavar="PATH", help="measure nothing: read the rows of an earlier --json run")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _grid(args, parser, device_type: str) -> list[tuple]:
    default = QUICK_GRID if args.quick else DEFAULT_GRID[device_type]
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
    if args.load:
        try:
            with open(args.load) as f:
                rows = json.load(f)
        except (OSError, ValueError) as err:
            parser.error(f"--load: cannot read {args.load}: {err}")
        if not isinstance(rows, list) or not all(isinstance(r, dict) and set(FIELDS) <= set(r) for r in rows):
            parser.error(f"--load: {args.load} is not the --json output of this bench")
        emit(rows, args.json, args.csv, args.plot)
        return 0
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

    here = list(BASE_PROVIDERS) + backends.available_backends(device.type)
    if args.providers:
        providers = _names(parser, args.providers, list(BASE_PROVIDERS) + list(backends.REGISTRY), "providers")
        missing = [p for p in providers if p not in here]
        if missing:
            parser.error(f"--providers: {missing} not available on {device.type} here; "
                         f"available: {', '.join(here)}")
    else:
        providers = here
    target_names = _names(parser, args.targets, list(targets.TARGETS), "targets")
    modes = _names(parser, args.modes, MODES, "modes")
    grid = _grid(args, parser, device.type)

    timer = Timer(device)
    meta = metadata(device, timer)
    warn_if_loaded(device, meta["load_avg"])
    cases = build_cases(grid, target_names, modes, providers, device.type)
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
    emit(finish_rows(rows, meta), args.json, args.csv, args.plot)
    print(f"\n{len(rows)} cells in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0

