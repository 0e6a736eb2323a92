"""`python -m pmrl_kernels.bench`: PMRL side by side with the published recipe and plain torch, on this machine.

Targets: the whole loss, the alignment term alone (reg_weight=0), gram_svd (S and lead) and the contrastive term.
Modes: forward (grad enabled, as in training), backward (the forward runs untimed first), full (both).
Providers: the published recipe (full SVD), torch.linalg.svd reduced, torch.linalg.svdvals (alignment only), the
best torch composition (Gram by bmm + torch.linalg.eigh, autograd) and every backend of `available_backends()`
that runs on the device. Every provider gets the same M separate [B, D] tensors (what M encoders produce), so the
stacking that the SVD/Gram compositions need is part of their cost. Linear algebra of the torch compositions runs
in float32 for 16-bit inputs, as autocast would.

Each cell, for every provider alike: on CUDA one cold warm-up call; one warm-up call that measures peak extra
memory and estimates the time; then up to --repeats timed calls (fewer for slow cells, never under 3) with
perf_counter on CPU or CUDA events on GPU (L2 flushed before each, as triton.testing.do_bench does). Speedups
compare medians measured in the same run.

Row fields (JSON, CSV; the table shows the main ones):
  state          ok | skip (the backend cannot take the input) | OOM | OOM-skip (over the memory budget, or OOM at
                 a smaller B) | timeout (one call over --time-limit) | timeout-skip (so at a smaller B, or
                 predicted so from it: time x B^2 for loss and contrastive, x B otherwise) | error; `note` says why
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

import argparse
import contextlib
import csv
import importlib.metadata
import importlib.util
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch._C._profiler import _EventType

from . import backends, reference
from .inputs import compute_dtype
from .loss import gram_svd, pmrl_loss

TAU, TAU_REG = 0.05, 0.1  # the published defaults
TARGETS = ("loss", "align", "gram_svd", "contrastive")
MODES = ("forward", "backward", "full")
BASE_PROVIDERS = {  # provider -> targets it computes
    "recipe": ("loss", "align", "gram_svd"),
    "svd": ("loss", "align", "gram_svd"),
    "svdvals": ("align",),
    "torch": TARGETS,
}
BASELINES = ("recipe", "svd", "torch")  # speedup columns
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}

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
CELL_BUDGET_S = 0.5  # timed calls per cell stop at about this much time (at least 3 calls)
FIELDS = (
    "target", "mode", "provider", "dtype", "B", "M", "D", "state", "note",
    "median_ms", "p20_ms", "p80_ms", "calls", "peak_mem_mb",
    "speedup_vs_recipe", "speedup_vs_svd", "speedup_vs_torch", "floor_bytes", "gbps", "copy_fraction",
    "device", "device_type", "copy_gbps", "memory_method", "timer", "threads", "load_avg", "torch", "triton", "python",
    "commit",
)


@dataclass(frozen=True)
class Case:
    target: str
    provider: str
    mode: str
    dtype: str
    B: int
    M: int
    D: int


class Skip(Exception):
    """The cell cannot run; args[0] is its state, args[1] the reason."""


# --- providers: each maps the inputs to a tuple of differentiable outputs -------------------------------------

def _finish(target: str, s: torch.Tensor, lead: Optional[torch.Tensor]) -> tuple:
    if target == "gram_svd":
        return s, lead
    align = reference.alignment(s, TAU).mean()
    if target == "align":
        return (align,)
    return (align + reference.contrastive(lead, lead, TAU_REG).mean(),)


def _recipe_stack(zs: list[torch.Tensor]) -> torch.Tensor:
    """[B, D, M] of the normalised rows, as the published code stacks them."""
    cd = compute_dtype(zs[0].dtype)
    return torch.stack([F.normalize(z.to(cd), dim=-1) for z in zs], dim=-1)


def _svd(zs, target, full_matrices):
    u, s, _ = torch.linalg.svd(_recipe_stack(zs), full_matrices=full_matrices)
    return _finish(target, s, u[..., 0])


def _recipe(zs, target):
    if target == "loss":
        cd = compute_dtype(zs[0].dtype)
        return (reference.official_recipe_loss([z.to(cd) for z in zs], tau=TAU, tau_reg=TAU_REG),)
    return _svd(zs, target, full_matrices=True)


def _svdvals(zs, target):
    return _finish(target, torch.linalg.svdvals(_recipe_stack(zs)), None)


def _torch_gram(zs, target):
    zn = F.normalize(torch.stack(zs, dim=1).to(compute_dtype(zs[0].dtype)), dim=-1)  # [B, M, D]
    lam, u = reference.eigh_descending(torch.bmm(zn, zn.transpose(1, 2)))
    s = lam.sqrt()
    lead = torch.bmm(u[:, :, :1].transpose(1, 2), zn).squeeze(1) / s[:, :1]
    return _finish(target, s, lead)


def _torch_contrastive(rows, target):
    return (reference.contrastive(rows[0], rows[0], TAU_REG).mean(),)


BASE_FORWARD = {
    "recipe": _recipe,
    "svd": lambda zs, target: _svd(zs, target, full_matrices=False),
    "svdvals": _svdvals,
    "torch": _torch_gram,
}


def _backend_forward(name: str, target: str, inputs: list[torch.Tensor]):
    """The forward of backend `name` for this target; raises Skip when the backend cannot take the inputs."""
    try:  # the contrastive input is one [B, D] tensor: probe the backend with it as two modalities
        module = backends.resolve(name, inputs * 2 if target == "contrastive" else inputs)
    except ValueError as err:
        raise Skip("skip", str(err)) from None
    if target == "loss":
        return lambda zs: (pmrl_loss(zs, tau=TAU, tau_reg=TAU_REG, backend=name),)
    if target == "align":
        return lambda zs: (pmrl_loss(zs, tau=TAU, reg_weight=0.0, backend=name),)
    if target == "gram_svd":
        return lambda zs: gram_svd(zs, backend=name)[::2]  # S and lead; U carries no gradient
    return lambda rows: (module.contrastive(rows[0], rows[0], TAU_REG, 0).mean(),)


def providers_for(target: str, names: list[str], modules: dict) -> list[str]:
    """The providers among `names` that compute `target`. For the contrastive term the recipe, the reference and
    the torch composition run the same code (matmul + cross_entropy), measured once as "torch"; a backend counts
    only when it brings its own `contrastive`."""
    def computes(name):
        if name in BASE_PROVIDERS:
            return target in BASE_PROVIDERS[name]
        own = getattr(modules[name], "contrastive", reference.contrastive) is not reference.contrastive
        return target != "contrastive" or own
    return [n for n in names if computes(n)]


# --- inputs, size estimates, callables ---------------------------------------------------------------------------

def make_inputs(dtype: str, b: int, m: int, d: int, device: torch.device, seed: int = 0) -> dict:
    """{"z": M tensors [B, D], "lead": [unit rows [B, D] in the compute dtype]}, all requiring grad."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = DTYPES[dtype]
    zs = [torch.randn(b, d, generator=gen, device=device, dtype=dt).requires_grad_() for _ in range(m)]
    lead = F.normalize(torch.randn(b, d, generator=gen, device=device, dtype=compute_dtype(dt)), dim=-1)
    return {"z": zs, "lead": [lead.requires_grad_()]}


def estimated_bytes(case: Case, module=None) -> int:
    """A lower bound of the cell's working memory, to skip what cannot fit before trying it."""
    b, m, d = case.B, case.M, case.D
    elem = 8 if case.dtype == "float64" else 4
    est = 4 * b * m * d * elem  # inputs, their normalised copy, gradients
    if case.provider == "recipe" and case.target != "contrastive":
        est += 2 * b * d * d * elem  # full U [B, D, D] and its gradient
    own_contrastive = getattr(module, "contrastive", reference.contrastive) is not reference.contrastive
    if case.target in ("loss", "contrastive") and not own_contrastive:
        est += 3 * b * b * elem  # B x B logits, their softmax and gradient
    return est


def floor_bytes(case: Case) -> int:
    """Bytes that must move at least: inputs read (twice with a backward) and gradients written, outputs."""
    elem = DTYPES[case.dtype].itemsize
    cd = compute_dtype(DTYPES[case.dtype]).itemsize
    if case.target == "contrastive":
        inp, out = case.B * case.D * cd, 0
    else:
        inp = case.B * case.M * case.D * elem
        out = case.B * (case.M + case.D) * cd if case.target == "gram_svd" else 0
    return {"forward": inp + out, "backward": 2 * inp + out, "full": 3 * inp + 2 * out}[case.mode]


def callables(forward: Callable, inputs: list[torch.Tensor], mode: str):
    """(setup, fn): setup runs untimed before each call and returns fn's argument."""
    def fresh():
        for x in inputs:
            x.grad = None

    def backward(outs):
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    if mode == "forward":
        return fresh, lambda _: forward(inputs)
    if mode == "backward":
        def setup():
            fresh()
            outs = forward(inputs)
            return outs, [torch.ones_like(o) for o in outs]
        return setup, lambda og: torch.autograd.backward(*og)
    return fresh, lambda _: backward(forward(inputs))


# --- timing and memory -------------------------------------------------------------------------------------------

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


def measure(setup, fn, timer: Timer, repeats: int, time_limit: float) -> dict:
    """Timing and memory of one cell, or the state that stopped it."""
    try:
        if timer.cuda:
            timer.once(setup, fn)  # cold: JIT compilation, autotuning, library handles, allocator growth
        seconds, peak = timer.once(setup, fn)  # on CPU this is the warm-up: nothing there compiles on first use
        if seconds > time_limit:
            return {"state": "timeout", "note": f"one call took {seconds:.2f} s > {time_limit:g} s"}
        calls = max(min(3, repeats), min(repeats, int(CELL_BUDGET_S / max(seconds, 1e-9))))
        median, p20, p80 = quantiles(timer.repeat(setup, fn, calls))
    except Exception as err:  # noqa: BLE001 -- one failing provider must not stop the sweep
        first_line = str(err).splitlines()[0][:200] if str(err) else ""
        failure = {"state": "OOM", "note": first_line} if _is_oom(err) else {
            "state": "error", "note": f"{type(err).__name__}: {first_line}"}
    else:
        return {
            "state": "ok", "median_ms": median * 1e3, "p20_ms": p20 * 1e3, "p80_ms": p80 * 1e3, "calls": calls,
            "peak_mem_mb": max(peak, 0) / 2**20,
        }
    if timer.cuda:
        # only now, with the exception and the tensors its frames held gone, are their cached blocks free
        torch.cuda.empty_cache()
    return failure


# --- the sweep -----------------------------------------------------------------------------------------------------

def build_cases(grid, targets, modes, providers, modules) -> list[Case]:
    """Cases in the order they run: the grid's (dtype, M, D) series in the order given, each by ascending B
    (timeouts and OOM at small B rule out larger B), then every provider of one (size, target, mode) side by side."""
    series = {}
    for dtype, _, m, d in grid:
        series.setdefault((dtype, m, d), len(series))
    cases = []
    for dtype, b, m, d in sorted(set(grid), key=lambda p: (series[(p[0], p[2], p[3])], p[1])):
        for target, mode in itertools.product(targets, modes):
            cases += [Case(target, p, mode, dtype, b, m, d) for p in providers_for(target, providers, modules)]
    return cases


def prepare(case: Case, inputs: dict, modules: dict, budget_bytes: int):
    """(setup, fn) of the case, or Skip."""
    module = modules.get(case.provider)
    need = estimated_bytes(case, module)
    if need > budget_bytes:
        raise Skip("OOM-skip", f"needs >= {need / 2**30:.1f} GiB, budget {budget_bytes / 2**30:.1f} GiB")
    args = inputs["lead" if case.target == "contrastive" else "z"]
    if case.provider in BASE_FORWARD:
        base = BASE_FORWARD[case.provider] if case.target != "contrastive" else _torch_contrastive
        forward = lambda xs: base(xs, case.target)  # noqa: E731
    else:
        forward = _backend_forward(case.provider, case.target, args)
    return callables(forward, args, case.mode)


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


def run(cases: list[Case], device: torch.device, modules: dict, timer: Timer, *, repeats: int,
        time_limit: float, budget_bytes: int, progress: bool = True) -> list[dict]:
    """One row per case. A timeout or OOM at some B marks the same cell at larger B, and so does a time
    predicted over the limit (scaled by B^2 for the targets with B x B work, else by B)."""
    rows, inputs, inputs_key, history = [], None, None, {}
    bar = Progress(len(cases), progress)
    for case in cases:
        bar.start(f"{case.target} {case.mode} {case.provider} {case.dtype} B={case.B} M={case.M} D={case.D}")
        size_key = (case.dtype, case.B, case.M, case.D)
        if size_key != inputs_key:
            inputs, inputs_key = None, size_key  # free the previous size first
            inputs = make_inputs(*size_key, device=device)
        series = (case.target, case.provider, case.mode, case.dtype, case.M, case.D)
        try:
            previous = history.get(series)
            if previous is not None and previous["state"] in ("OOM", "OOM-skip", "timeout", "timeout-skip"):
                raise Skip(previous["state"].split("-")[0] + "-skip", f"{previous['state']} at B={previous['B']}")
            if previous is not None and previous["state"] == "ok":
                power = 2 if case.target in ("loss", "contrastive") else 1
                predicted = previous["median_ms"] / 1e3 * (case.B / previous["B"]) ** power
                if predicted > time_limit:
                    raise Skip("timeout-skip", f"predicted >= {predicted:.1f} s a call from B={previous['B']}")
            setup, fn = prepare(case, inputs, modules, budget_bytes)
            result = measure(setup, fn, timer, repeats, time_limit)
        except Skip as skip:
            result = {"state": skip.args[0], "note": skip.args[1]}
        row = {**asdict(case), **result}
        history[series] = row
        rows.append(row)
        bar.step()
    bar.close()
    return rows


def finish_rows(rows: list[dict], meta: dict) -> list[dict]:
    """Speedups over the baselines measured in the same run, bandwidth, and the run's metadata on every row."""
    by_key = {(r["target"], r["mode"], r["dtype"], r["B"], r["M"], r["D"], r["provider"]): r for r in rows}
    for r in rows:
        key = (r["target"], r["mode"], r["dtype"], r["B"], r["M"], r["D"])
        for base in BASELINES:
            # the recipe's regulariser is the torch composition (see providers_for)
            name = "torch" if r["target"] == "contrastive" and base == "recipe" else base
            ref = by_key.get(key + (name,))
            ok = r["state"] == "ok" and ref is not None and ref["state"] == "ok"
            r[f"speedup_vs_{base}"] = ref["median_ms"] / r["median_ms"] if ok else None
        case = Case(**{k: r[k] for k in Case.__dataclass_fields__})
        r["floor_bytes"] = floor_bytes(case)
        r["gbps"] = r["floor_bytes"] / r["median_ms"] / 1e6 if r["state"] == "ok" else None
        r["copy_fraction"] = r["gbps"] / meta["copy_gbps"] if r["gbps"] is not None else None
        r.update(meta)
    return [{f: r.get(f) for f in FIELDS} for r in rows]


# --- metadata and outputs ------------------------------------------------------------------------------------------

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} CPUs)"


def git_commit() -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def version_of(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


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
        state = r["state"] if not r["note"] else f"{r['state']}: {r['note']}"
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
    targets = [t for t in TARGETS if any(r["target"] == t for r in ok)]
    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    if not targets:
        raise ValueError("nothing to plot: no cell ran")
    fig, axes = plt.subplots(len(targets), len(modes), figsize=(4.5 * len(modes), 3.4 * len(targets)),
                             squeeze=False)
    styles = dict(zip(swept, itertools.cycle(["-", "--", ":", "-."])))
    colors = {p: f"C{i}" for i, p in enumerate(dict.fromkeys(r["provider"] for r in ok))}  # same in every panel
    batches = sorted({r["B"] for r in ok if (r["dtype"], r["M"], r["D"]) in swept})
    for (i, target), (j, mode) in itertools.product(enumerate(targets), enumerate(modes)):
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


# --- command line ------------------------------------------------------------------------------------------------

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
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma list of {', '.join(TARGETS)}")
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


def _emit(rows: list[dict], args):
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.csv:
        write_csv(rows, args.csv)
    if args.plot:
        plot(rows, args.plot)


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
        _emit(rows, args)
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

    modules = backends.backend_modules(device.type)
    here = list(BASE_PROVIDERS) + list(modules)
    if args.providers:
        providers = _names(parser, args.providers, list(BASE_PROVIDERS) + list(backends.REGISTRY), "providers")
        missing = [p for p in providers if p not in here]
        if missing:
            parser.error(f"--providers: {missing} not available on {device.type} here; "
                         f"available: {', '.join(here)}")
    else:
        providers = here
    targets = _names(parser, args.targets, TARGETS, "targets")
    modes = _names(parser, args.modes, MODES, "modes")
    grid = _grid(args, parser, device.type)

    timer = Timer(device)
    meta = {
        "device": device_name(device), "device_type": device.type, "copy_gbps": timer.copy_gbps(),
        "memory_method": timer.memory_method, "timer": timer.timer, "threads": torch.get_num_threads(),
        "load_avg": os.getloadavg()[0],
        "torch": torch.__version__, "triton": version_of("triton"), "python": platform.python_version(),
        "commit": git_commit(),
    }
    if device.type == "cpu" and meta["load_avg"] > 0.5 * (os.cpu_count() or 1):
        # other work on the cores preempts torch's OpenMP threads: times grow erratically, up to 100x
        print(f"warning: load average {meta['load_avg']:.1f} on {os.cpu_count()} CPUs: CPU timings will be noisy",
              file=sys.stderr)
    cases = build_cases(grid, targets, modes, providers, modules)
    if not cases:
        parser.error("no provider computes the chosen targets (svdvals computes align only)")
    t0 = time.perf_counter()
    rows = run(cases, device, modules, timer, repeats=repeats, time_limit=args.time_limit,
               budget_bytes=memory_budget(device, args.mem_budget), progress=not args.no_progress)
    rows = finish_rows(rows, meta)
    _emit(rows, args)
    print(f"\n{len(rows)} cells in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
