#!/usr/bin/env python3
"""The logic behind benchmarks/gpu_check.sh: one GPU acceptance run of pmrl_kernels, every result in $OUT.

Subcommands (each writes <steps>/<step>.json; `finish` closes a step and rewrites the summary):
  env          versions, GPU, tools
  bandwidth    measured device-to-device copy bandwidth (read + write bytes), the ceiling for the kernels
  sanitize     small driver for compute-sanitizer: gram_svd and pmrl_loss forward+backward over a deterministic
               sample of dtypes x M x D x B x layouts x normalize
  correctness  cuda/triton (cpp/triton-interpreted in --dry-run) against the float64 reference on the same input
  large        one backend on B*M*D > 2^31 bfloat16 elements (run by correctness, one subprocess per backend)
  bench        fwd+bwd timings at B=65536, D=512 (tiny sizes in --dry-run), peak memory, fraction of copy bandwidth
  bench-cli    a small explicit sweep of `python -m pmrl_kernels.bench` (optional, if time is left)
  ncu-driver   one forward and one backward of the cuda and triton gram kernels, for Nsight Compute
  finish       parse the logs of the steps that bash ran (build, sanitizer, ncu, pytest), record rc/time/timeouts
  summarize    merge the step files into summary.json, summary.txt and bench.json

Only the public API is used: pmrl_kernels.gram_svd, pmrl_kernels.pmrl_loss, pmrl_kernels.available_backends (and
the published recipe from pmrl_kernels.baselines, or pmrl_kernels.reference where it used to live), except for the
sanitizer's gathered-columns contrastive call, which the loss makes only under torch.distributed
(pmrl_kernels.backends.resolve).
torch is imported lazily so that `finish`/`summarize` stay fast and work even where torch is broken.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional
from unittest import mock

ROOT = Path(os.environ.get("GPU_CHECK_ROOT") or Path(__file__).absolute().parent.parent)
# The tree under test, not whatever else may be installed (pip -e . points here anyway; without a build this
# still gives the pure-Python package and its reference backend).
sys.path.insert(0, str(ROOT))

STEP_ORDER = ("env", "static", "build", "bandwidth", "sanitizer", "correctness", "bench", "ncu", "pytest", "bench_cli")
OUT_FILES = ("summary.json", "summary.txt", "build.log", "sanitizer.log", "pytest.log", "bench.json", "ncu.txt",
             "steps.log")  # the only files written to $OUT: at most 8 come back from the device machine

# ||out - ref|| / ||ref|| against the float64 reference run on the *same* (already rounded) input. Kernels compute
# in float32 for 16-bit inputs, so S, lead and the loss are float32-accurate whatever the input dtype; only the
# gradient, returned in the input dtype, carries 16-bit rounding.
THRESHOLDS = {
    "float64": {"S": 1e-9, "S2": 1e-9, "U": 1e-7, "lead": 1e-7, "loss": 1e-9, "grad": 1e-7},
    "float32": {"S": 1e-4, "S2": 1e-4, "U": 1e-3, "lead": 1e-3, "loss": 1e-4, "grad": 1e-3},
    "bfloat16": {"S": 1e-4, "S2": 1e-4, "U": 1e-3, "lead": 1e-3, "loss": 1e-4, "grad": 2e-2},
    "float16": {"S": 1e-4, "S2": 1e-4, "U": 1e-3, "lead": 1e-3, "loss": 1e-4, "grad": 5e-3},
}
QUANTITIES = ("S", "S2", "U", "lead", "loss", "grad_gram", "grad_loss")
# U is compared on the columns it defines: eigenvalue apart from the others by U_GAP lambda_1, and a sign (the
# column sum's, as the canonical sign) of at least U_SUM. Only U shows a wrong non-leading column: the gradients
# use u_k u_k^T, where its sign cancels (the H200's chunked Triton forward wrote a wrong column in run 4, which
# only pytest's U check caught).
U_GAP, U_SUM = 1e-3, 1e-2
# S is compared where sigma_k > 1e-2 sigma_1: below, sqrt turns the eigenvalues' rounding noise into sqrt(eps)
# (D < M, rank-1 inputs); S2 = S^2 (the eigenvalues of G, accurate everywhere) is compared on every entry.
S_NOISE = 1e-2
# A kernel may also be off by twice what the reference itself is off when run in the kernel's compute dtype
# (FlashAttention's rule, as tests/test_extension.py): near singular points fp32 noise is legitimate.
BASELINE_FACTOR = 2.0
BASELINE_FLOOR = 1e-12

TAU, TAU_REG = 0.05, 0.1
KERNEL_BACKENDS_GPU = ("cuda", "triton")
KERNEL_BACKENDS_CPU = ("cpp", "triton")  # --dry-run: triton only under TRITON_INTERPRET=1
BACKEND_DTYPES = {"cuda": ("float32", "bfloat16", "float16", "float64"),
                  "cpp": ("float32", "bfloat16", "float16", "float64"),
                  "triton": ("float32", "bfloat16", "float16")}  # triton refuses float64
LAYOUTS = ("list", "contiguous", "offset", "padded", "transposed")
PAD = 3  # extra features per row in the "padded" layout: odd, so rows are misaligned too


# ----------------------------------------------------------------------------------------------- small helpers

def _torch():
    import torch  # noqa: PLC0415 (lazy: finish/summarize must not pay for it)
    return torch


def now() -> float:
    return time.time()


def write_json(path: Path, data) -> None:
    """Atomic: a step killed by its timeout leaves the last complete version, never half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=_json_default)
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    return str(o)


def _clean(o):
    """JSON has no NaN/Inf: write them as strings so every reader can load summary.json."""
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def read_json(path: Path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


class Step:
    """One step's record, saved after every change so a timeout keeps the partial results."""

    def __init__(self, steps_dir: Path, name: str, budget: Optional[float] = None, margin: float = 5.0):
        self.path = steps_dir / f"{name}.json"
        self.margin = margin  # seconds the longest single unit of work may take: start none with less left
        self.t0 = now()
        self.budget = budget
        self.data: dict[str, Any] = {"step": name, "status": "running", "reason": "", "started": self.t0}
        self.save()

    def left(self) -> float:
        """Seconds left of this step's own budget (the bash timeout is a few seconds later)."""
        return math.inf if self.budget is None else self.budget - (now() - self.t0)

    def out_of_time(self) -> bool:
        return self.left() < self.margin

    def save(self):
        self.data["seconds"] = round(now() - self.t0, 2)
        write_json(self.path, _clean(self.data))

    def done(self, status: str, reason: str = ""):
        self.data["status"], self.data["reason"] = status, reason
        self.save()


def device_name(torch, device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def release(torch) -> None:
    """Give cached blocks back between cells; after a CUDA fault this raises too, and must not end the step."""
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001, S110
        pass


def dtype_of(torch, name: str):
    return getattr(torch, name)


def recipe_fn():
    """The published recipe: in pmrl_kernels.baselines now, in pmrl_kernels.reference before."""
    try:
        from pmrl_kernels.baselines import official_recipe_loss  # noqa: PLC0415
    except ImportError:
        from pmrl_kernels.reference import official_recipe_loss  # noqa: PLC0415
    return official_recipe_loss


# ----------------------------------------------------------------------------------------------- error metric

def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64 (the RMS error where ref is all zero); inf when the non-finite entries
    differ."""
    torch = _torch()
    out = out.detach().to("cpu", torch.float64).reshape(-1)
    ref = ref.detach().to("cpu", torch.float64).reshape(-1)
    if out.shape != ref.shape:
        return math.inf
    bad_o, bad_r = ~torch.isfinite(out), ~torch.isfinite(ref)
    if not torch.equal(bad_o, bad_r):
        return math.inf
    out, ref = out[~bad_r], ref[~bad_r]
    num = torch.linalg.vector_norm(out - ref).item()
    den = torch.linalg.vector_norm(ref).item()
    if den == 0.0:
        # an exactly zero reference (e.g. the gradient through the normalisation at D = 1): the RMS error, i.e.
        # relative to entries of unit size, the scale of the inputs and upstream gradients here
        return num / math.sqrt(max(ref.numel(), 1))
    return num / den


def verdict(err: float, threshold: float, baseline: Optional[float] = None) -> dict:
    """Pass when err <= threshold, or within BASELINE_FACTOR x the error of the reference itself run in the
    kernel's compute dtype (near singular points that is the honest bound). `limit` is the bound applied."""
    limit = threshold
    if baseline is not None and math.isfinite(baseline):
        limit = max(threshold, BASELINE_FACTOR * baseline + BASELINE_FLOOR)
    ok = math.isfinite(err) and err <= limit
    return {"err": err, "threshold": threshold, "baseline": baseline, "limit": limit, "ok": bool(ok)}


# ----------------------------------------------------------------------------------------------- inputs

def make_layout(x, layout: str):
    """(embeddings argument, tensors to differentiate by) holding the values of x [B, M, D] in `layout`."""
    torch = _torch()
    b, m, d = x.shape
    if layout == "list":  # M separate contiguous [B, D] tensors, as M encoders produce them
        zs = [x[:, i].clone(memory_format=torch.contiguous_format).requires_grad_() for i in range(m)]
        return zs, zs
    if layout == "contiguous":
        t = x.clone().contiguous()
    elif layout == "offset":  # data pointer one element into a bigger buffer: misaligned for vector loads
        buf = torch.zeros(b * m * d + 1, dtype=x.dtype, device=x.device)
        t = buf[1:].view(b, m, d)
        t.copy_(x)
    elif layout == "padded":  # row stride D + PAD, instance stride M (D + PAD)
        buf = torch.zeros(b, m, d + PAD, dtype=x.dtype, device=x.device)
        t = buf[..., :d]
        t.copy_(x)
    elif layout == "transposed":  # feature stride B*M, not 1
        t = x.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    t.requires_grad_()
    return t, [t]


def as_bmd(grads, layout: str):
    """The gradient w.r.t. the layout's tensors as one [B, M, D] tensor."""
    torch = _torch()
    return torch.stack(list(grads), 1) if layout == "list" else grads[0]


def seeded_randn(torch, shape, seed: int, device, dtype):
    """Generated in float64 on the CPU, so every device and dtype sees the same values (then rounded)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def degenerate_inputs(torch, b: int, d: int, seed: int) -> dict:
    """[B, M, D] float64 inputs at the points that break plain SVD autograd (what training produces)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    base = randn(b, 1, d)
    return {
        "rank1_optimum": base.expand(b, 4, d) * torch.rand(b, 4, 1, generator=g, dtype=torch.float64).add(0.5),
        "duplicated_modality": torch.cat([base, base, randn(b, 2, d)], 1),
        "zero_row": torch.cat([torch.zeros(b, 1, d, dtype=torch.float64), randn(b, 3, d)], 1),
        "d_less_than_m": randn(b, 5, 3),
        # high-D random rows: G close to I, top eigenvalues nearly tied (initialisation)
        "near_tie": randn(b, 4, max(d, 16) * 64),
    }


# ----------------------------------------------------------------------------------------------- env

def cmd_env(args):
    step = Step(args.steps, "env", args.budget)
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                            "cpu_count": os.cpu_count(), "dry_run": args.dry_run, "root": str(ROOT)}

    def run(cmd, timeout=20) -> Optional[str]:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            return (r.stdout + r.stderr).strip() if r.returncode == 0 else f"rc {r.returncode}: {r.stderr.strip()}"
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"unavailable: {err}"

    info["nvidia_smi_L"] = run(["nvidia-smi", "-L"])
    info["nvidia_smi_query"] = run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                                    "clocks.max.mem,power.limit", "--format=csv,noheader"])
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)
    info["nvcc_path"] = nvcc
    text = run([nvcc, "--version"]) if nvcc else "nvcc not found"
    m = re.search(r"release ([\d.]+), V([\d.]+)", text or "")
    info["nvcc"] = m.group(2) if m else text
    info["cuda_home"] = os.environ.get("CUDA_HOME")
    for tool, env in (("ncu", "NCU"), ("compute-sanitizer", "SANITIZER")):
        path = os.environ.get(env) or shutil.which(tool)
        info[tool] = {"path": path, "version": (run([path, "--version"]) or "").splitlines()[-1:] if path else None}
    # GPU_CHECK_COMMIT: the commit the caller sent (the device machine gets the working tree as files, over a
    # checkout of its own whose `git describe` names another commit)
    info["git_commit"] = os.environ.get("GPU_CHECK_COMMIT") or run(["git", "-C", str(ROOT), "describe", "--always",
                                                                    "--dirty"])
    try:
        torch = _torch()
        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["device"] = torch.cuda.get_device_name(0)
            info["capability"] = f"sm_{p.major}{p.minor}"
            info["device_memory_gib"] = round(p.total_memory / 2**30, 1)
            info["sm_count"] = p.multi_processor_count
        else:
            info["device"] = device_name(torch, torch.device("cpu"))
        try:
            import triton  # noqa: PLC0415
            info["triton"] = triton.__version__
        except ImportError as err:
            info["triton"] = f"not importable: {err}"
        import pmrl_kernels  # noqa: PLC0415
        info["pmrl_kernels"] = getattr(pmrl_kernels, "__version__", "?")
        # not available_backends(): before the build step that would compile the extension on first use
        info["extension_installed"] = importlib.util.find_spec("pmrl_kernels._C") is not None
    except Exception as err:  # noqa: BLE001 (record, never abort)
        info["error"] = f"{type(err).__name__}: {err}"
    step.data.update(info)
    want_gpu = not args.dry_run
    if "error" in info:
        step.done("failed", info["error"])
    elif want_gpu and not info.get("cuda_available"):
        step.done("failed", "torch sees no CUDA device")
    else:
        step.done("ok", f"{info.get('device')}; torch {info.get('torch')}, triton {info.get('triton')}, "
                        f"nvcc {info.get('nvcc')}")


# ----------------------------------------------------------------------------------------------- bandwidth

def measure_copy(torch, device, nbytes: int, repeats: int = 10) -> dict:
    """Median time of dst.copy_(src); bandwidth counts the bytes read and written (2 x nbytes)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        events = []
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src)
            b.record()
            events.append((a, b))
        torch.cuda.synchronize()
        times = [a.elapsed_time(b) / 1e3 for a, b in events]
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"bytes_copied": nbytes, "bytes_moved": 2 * nbytes, "median_ms": med * 1e3,
            "min_ms": min(times) * 1e3, "max_ms": max(times) * 1e3, "repeats": repeats,
            "copy_gbps": 2 * nbytes / med / 1e9}


def cmd_static(args):
    """What the compilers say for sm_90 (benchmarks/static_check.py): spills and stack frames of every CUDA and
    Triton kernel, MMA in the contrastive kernels. Reads GPU_CHECK_STATIC_REPORT when set (the test suite computes
    the report once and hands it over), else runs the check without TRITON_INTERPRET (the compiler, not the
    interpreter) in a subprocess."""
    step = Step(args.steps, "static", args.budget)
    given = os.environ.get("GPU_CHECK_STATIC_REPORT")
    if given:
        report = read_json(Path(given))
        step.data["source"] = given
    else:
        path = args.steps / "static_report.json"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, str(ROOT / "benchmarks" / "static_check.py"), "--json", str(path)]
        try:
            subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=max(10.0, (args.budget or 600) - 5))
        except subprocess.TimeoutExpired:
            step.done("failed", "static_check.py ran out of time")
            return
        report = read_json(path)
        step.data["source"] = "static_check.py"
    if not report or "summary" not in report:
        step.done("failed", "no static report")
        return
    summary = report["summary"]
    step.data.update(summary)
    parts = [f"CUDA {summary['cuda_kernels_m_le_8']} kernels M<=8: {summary['cuda_spill_bytes_m_le_8']} B spilled, "
             f"stack <= {summary['cuda_max_stack_bytes_m_le_8']} B",
             f"Triton {summary['triton_kernels']} kernels: {summary['triton_spill_bytes_m_le_8']} B spilled (M<=8)",
             "contrastive MMA " + ", ".join(f"{k} {'yes' if v else 'no'}"
                                           for k, v in summary["triton_contrastive_mma"].items())]
    problems = summary["problems"]
    step.done("failed" if problems else "ok", "; ".join(parts + problems[:3]))


def cmd_bandwidth(args):
    step = Step(args.steps, "bandwidth", args.budget)
    torch = _torch()
    device = torch.device("cpu" if args.dry_run else "cuda")
    nbytes = (64 if args.dry_run else 4096) * 2**20
    step.data.update(device=device_name(torch, device), method=(
        "CUDA events, median of 10" if device.type == "cuda" else "perf_counter, median of 10") +
        f"; {nbytes / 2**30:g} GiB float32 copy, read + write bytes")
    step.data.update(measure_copy(torch, device, nbytes))
    step.done("ok", f"copy {step.data['copy_gbps']:.0f} GB/s ({nbytes / 2**30:g} GiB, read+write)")


def copy_gbps_from(steps: Path) -> Optional[float]:
    return (read_json(steps / "bandwidth.json") or {}).get("copy_gbps")


# ----------------------------------------------------------------------------------------------- sanitize

def sample_combos(axes: dict[str, list], n: int, seed: int) -> list[dict]:
    """n combos of the axes' values, deterministic: greedily cover every value of every axis at least once,
    then fill with random combos (the full product is far too slow under compute-sanitizer)."""
    keys = list(axes)
    rng = random.Random(seed)
    full = list(itertools.product(*(axes[k] for k in keys)))
    rng.shuffle(full)
    uncovered = {(k, v) for k in keys for v in axes[k]}
    chosen: list[tuple] = []
    while uncovered:
        best = max(full, key=lambda c: sum((k, v) in uncovered for k, v in zip(keys, c)))
        chosen.append(best)
        uncovered -= set(zip(keys, best))
    for c in full:
        if len(chosen) >= n:
            break
        if c not in chosen:
            chosen.append(c)
    return [dict(zip(keys, c)) for c in chosen]


def sanitize_combos(backend: str, n: int, seed: int) -> list[dict]:
    axes = {"dtype": list(BACKEND_DTYPES[backend]), "M": [2, 3, 5, 9, 16], "D": [1, 3, 129, 513],
            "B": [1, 7, 33], "layout": list(LAYOUTS), "normalize": [True, False]}
    return [dict(c, backend=backend) for c in sample_combos(axes, n, seed)]


def run_combo(torch, pk, combo: dict, device, seed: int) -> dict:
    """gram_svd forward + backward, pmrl_loss forward + backward and the contrastive term against gathered columns
    on one small input."""
    b, m, d = combo["B"], combo["M"], combo["D"]
    x = seeded_randn(torch, (b, m, d), seed, device, dtype_of(torch, combo["dtype"]))
    if b >= 7:
        x[0, 0] = 0  # an all-zero row: its own branch in the kernels
    emb, wrt = make_layout(x, combo["layout"])
    kw = dict(normalize=combo["normalize"], backend=combo["backend"])
    s, _, lead = pk.gram_svd(emb, **kw)
    gs = torch.randn(s.shape, generator=torch.Generator(device=device).manual_seed(seed), device=device,
                     dtype=s.dtype)
    gl = torch.randn(lead.shape, generator=torch.Generator(device=device).manual_seed(seed + 1), device=device,
                     dtype=lead.dtype)
    g1 = torch.autograd.grad([s, lead], wrt, [gs, gl])
    loss = pk.pmrl_loss(emb, tau=TAU, tau_reg=TAU_REG, reg_weight=1.0, **kw)
    g2 = torch.autograd.grad(loss, wrt)
    # the contrastive term as under torch.distributed: more columns than rows, the rows' targets at an offset
    rows = lead.detach().requires_grad_()
    cols = torch.cat([rows.detach().flip(0), rows.detach()]).requires_grad_()
    contrastive = pk.backends.resolve("contrastive", combo["backend"], (rows, cols))
    gathered = contrastive(rows, cols, TAU_REG, b)
    g3 = torch.autograd.grad(gathered.sum(), (rows, cols))
    if device.type == "cuda":
        torch.cuda.synchronize()
    finite = all(bool(torch.isfinite(t).all()) for t in (s, lead, loss, gathered, *g1, *g2, *g3))
    return {"finite": finite}


def kernel_setup(args):
    """(torch, pmrl_kernels, the device: the CPU in the dry run, the kernel backends wanted there that are available,
    those that are not)."""
    torch = _torch()
    import pmrl_kernels as pk  # noqa: PLC0415
    device = torch.device("cpu" if args.dry_run else "cuda")
    wanted = KERNEL_BACKENDS_CPU if args.dry_run else KERNEL_BACKENDS_GPU
    have = pk.available_backends(device.type)
    return torch, pk, device, [b for b in wanted if b in have], [b for b in wanted if b not in have]


def cmd_sanitize(args):
    """The compute-sanitizer driver. --tag names the run (plain, memcheck, racecheck, synccheck); --dry-run runs the
    same logic on the CPU with cpp and interpreted Triton and records the sanitizer step as skipped (no GPU).

    racecheck looks for shared-memory hazards, so it runs Triton only (the CUDA kernels share values by warp
    shuffles, without shared memory), and first the input Triton's chunked forward got wrong (chunked_fault_case):
    a race between its layout conversions would show there (README, Limits). The plain run takes that input first
    too, so that its variants are compiled before racecheck runs them."""
    name = "sanitizer" if args.dry_run else f"sanitize_{args.tag}"
    step = Step(args.steps, name, args.budget, margin=2 if args.dry_run else 5)
    torch, pk, device, backends, missing = kernel_setup(args)
    if args.tag == "racecheck":
        backends = [b for b in backends if b == "triton"]
    if args.tag in ("plain", "racecheck") and "triton" in backends:
        step.data["chunked_fault"] = _verdicts_or_error(lambda: chunked_fault_case(torch, pk, device))
        step.save()
    counts = {"cpp": args.sample, "cuda": args.sample, "triton": args.triton_sample or args.sample}
    per_backend = []
    for b in backends:
        combos = sanitize_combos(b, counts[b], seed=1234)
        if args.dry_run and b == "triton":  # the interpreter takes seconds a call at M = 16
            combos = [c for c in combos if c["M"] <= 5]
        per_backend.append(combos[:counts[b]])
    # interleaved, so a run cut short by its timeout has still covered both backends
    combos = [c for group in itertools.zip_longest(*per_backend) for c in group if c is not None]
    step.data.update(device=device_name(torch, device), tag=args.tag, backends=backends,
                     missing_backends=missing, planned=len(combos), done=0,
                     failures=[], combos=[])
    for i, combo in enumerate(combos):
        if step.out_of_time():
            step.data["stopped"] = f"step budget reached after {i} of {len(combos)} combos"
            break
        t0 = now()
        try:
            res = run_combo(torch, pk, combo, device, seed=100 + i)
            res["ok"] = res["finite"]
        except Exception as err:  # noqa: BLE001
            res = {"ok": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}
        row = dict(combo, seconds=round(now() - t0, 2), **res)
        step.data["combos"].append(row)
        step.data["done"] = i + 1
        if not row["ok"]:
            step.data["failures"].append(row)
        step.save()
    bad = len(step.data["failures"])
    summary = f"{step.data['done']}/{len(combos)} combos ran, {bad} failed ({', '.join(backends)})"
    if args.dry_run:
        step.data["driver_dry_run"] = summary
        step.done("skipped", f"no GPU (dry run); driver logic on CPU: {summary}")
    else:
        step.done("failed" if bad or not backends else "ok", summary)
    print(summary)


# ----------------------------------------------------------------------------------------------- correctness

def _forward_backward(torch, pk, emb, wrt, layout, backend, normalize, grad_s_top_only, seed):
    """S, lead, per-instance loss and the two input gradients of one backend (grad outputs seeded alike)."""
    s, u, lead = pk.gram_svd(emb, normalize=normalize, backend=backend)
    g = torch.Generator().manual_seed(seed)
    gs = torch.randn(s.shape, generator=g, dtype=torch.float64)
    if grad_s_top_only:  # below sigma_1 the singular values are fp32 noise at these inputs: no defined gradient
        gs[:, 1:] = 0
    gl = torch.randn(lead.shape, generator=g, dtype=torch.float64)
    dz_gram = as_bmd(torch.autograd.grad([s, lead], wrt, [gs.to(s), gl.to(lead)]), layout)
    loss = pk.pmrl_loss(emb, tau=TAU, tau_reg=TAU_REG, reg_weight=1.0, normalize=normalize, reduction="none",
                        backend=backend)
    dz_loss = as_bmd(torch.autograd.grad(loss.mean(), wrt), layout)
    return {"S": s.detach(), "U": u.detach(), "lead": lead.detach(), "loss": loss.detach(), "grad_gram": dz_gram,
            "grad_loss": dz_loss}


def defined_columns(torch, s, u):
    """[B, M] mask of the eigenvector columns of U [B, M, M] that are defined (U_GAP, U_SUM), from the exact S."""
    lam = s.double() ** 2
    gap = (lam[:, :, None] - lam[:, None, :]).abs()
    gap = gap.masked_fill(torch.eye(lam.shape[1], dtype=torch.bool, device=gap.device), torch.inf)
    return (gap.amin(-1) > U_GAP * lam[:, :1]) & (u.double().sum(-2).abs() > U_SUM)


def _threshold_key(q: str) -> str:
    return "grad" if q.startswith("grad") else q


def compare_case(torch, pk, x, *, backend, layout, normalize, grad_s_top_only, seed, lead_mask=True) -> dict:
    """One input x [B, M, D] (already in its dtype, on its device): the backend against the float64 reference
    on the same values upcast, with the reference in the backend's compute dtype as the baseline."""
    dtype = str(x.dtype).replace("torch.", "")
    outs = {}
    for who, xx, lay, be in (("kernel", x, layout, backend), ("exact", x.double(), "contiguous", "reference"),
                             ("base", x, "contiguous", "reference")):
        emb, wrt = make_layout(xx, lay)
        outs[who] = _forward_backward(torch, pk, emb, wrt, lay, be, normalize, grad_s_top_only, seed)
    exact = outs["exact"]
    keep = None
    if lead_mask:
        # lead is undefined at a tie of the top eigenvalues: compare it where the gap is resolvable
        lam = exact["S"].double() ** 2
        gap = lam[:, 0] - (lam[:, 1] if lam.shape[1] > 1 else 0)
        keep = gap > 1e-3 * lam[:, 0].clamp_min(1e-300)
    for o in outs.values():
        o["S2"] = o["S"].double() ** 2
    big = exact["S"] > S_NOISE * exact["S"][:, :1]
    cols = defined_columns(torch, exact["S"], exact["U"])
    res = {}
    for q in QUANTITIES:
        k, e, b = outs["kernel"][q], exact[q], outs["base"][q]
        if q == "U":  # [columns, M]
            k, e, b = (t.transpose(1, 2)[cols] for t in (k, e, b))
        if q == "lead" and keep is not None:
            k, e, b = k[keep], e[keep], b[keep]
        if q == "S":
            k, e, b = k[big], e[big], b[big]
        res[q] = verdict(rel_err(k, e), THRESHOLDS[dtype][_threshold_key(q)], rel_err(b, e))
    if keep is not None:
        res["lead"]["instances_compared"] = int(keep.sum())
    res["U"]["columns_compared"] = int(cols.sum())
    return res


def cmd_correctness(args):
    step = Step(args.steps, "correctness", args.budget, margin=3 if args.dry_run else 8)
    torch, pk, device, backends, missing = kernel_setup(args)
    dev = device_name(torch, device)
    step.data.update(device=dev, backends=backends, missing_backends=missing, rows=[], special=[],
                     thresholds=THRESHOLDS, rule=f"pass: err <= threshold or err <= {BASELINE_FACTOR} x err of "
                     "the reference in the kernel's compute dtype; err = ||out-ref||/||ref|| vs float64 reference "
                     "on the same rounded input")

    # (B, M, D, layout, normalize); the first shape runs in every dtype, the others in float32 and bfloat16
    if args.dry_run:
        # M <= 5: the Triton interpreter takes seconds a call at M = 16
        shapes = [(64, 4, 32, "list", True), (17, 3, 5, "offset", True), (9, 5, 3, "padded", False),
                  (33, 2, 7, "transposed", True), (20, 5, 40, "contiguous", True)]
        deg_b, deg_d = 8, 8
    else:
        shapes = [(4096, 4, 512, "list", True), (1000, 16, 257, "contiguous", True), (777, 3, 1, "offset", True),
                  (513, 9, 130, "padded", False), (300, 5, 2049, "transposed", True), (64, 2, 64, "list", True)]
        deg_b, deg_d = 256, 64

    # the dry run only exercises this script's logic: the Triton interpreter (about a second a call) gets the
    # first shape and two degenerate cases; the CPU test suite covers the kernels themselves
    interp = args.dry_run and device.type == "cpu"
    tasks: list[tuple[str, dict, Callable]] = []
    for be in backends:
        for i, (b, m, d, layout, normalize) in enumerate(shapes):
            if interp and be == "triton" and i > 0:
                continue
            dts = BACKEND_DTYPES[be] if i == 0 else [t for t in ("float32", "bfloat16") if t in BACKEND_DTYPES[be]]
            for dt in dts:
                meta = dict(backend=be, case="random", dtype=dt, B=b, M=m, D=d, layout=layout, normalize=normalize)

                def run(b=b, m=m, d=d, dt=dt, layout=layout, normalize=normalize, be=be, i=i):
                    x = seeded_randn(torch, (b, m, d), 10 + i, device, dtype_of(torch, dt))
                    return compare_case(torch, pk, x, backend=be, layout=layout, normalize=normalize,
                                        grad_s_top_only=d < 2 * m, seed=i)
                tasks.append(("row", meta, run))
        for name, x64 in degenerate_inputs(torch, deg_b, deg_d, seed=7).items():
            if interp and be == "triton" and name not in ("rank1_optimum", "zero_row"):
                continue
            b, m, d = x64.shape
            meta = dict(backend=be, case=name, dtype="float32", B=b, M=m, D=d, layout="contiguous", normalize=True)

            def run(x64=x64, be=be):
                return compare_case(torch, pk, x64.to(device=device, dtype=torch.float32), backend=be,
                                    layout="contiguous", normalize=True, grad_s_top_only=True, seed=3)
            tasks.append(("row", meta, run))
    # priority when the budget is short (Triton compiles every new specialisation): the first shape in float32
    # for each backend, then the stream and > 2^31 checks (the large case in subprocesses: a kernel fault ends
    # every later CUDA call of its process), then the remaining dtypes, shapes and degenerate inputs
    first = [t for t in tasks if t[1]["case"] == "random" and t[1]["dtype"] == "float32"
             and (t[1]["B"], t[1]["M"], t[1]["D"]) == shapes[0][:3]]
    # the rest with the backends taking turns, so that a short budget cuts each backend's tail alike
    rest = [t for t in tasks if t not in first]
    turn = {id(t): sum(o[1]["backend"] == t[1]["backend"] for o in rest[:i]) for i, t in enumerate(rest)}
    # and before them a diagnosis: which variant of Triton's chunked forward goes wrong (README, Limits), and the
    # timed variants of each backend (the interpreter at a small size)
    variant_size = (16, 4, 64) if args.dry_run else (4096, 4, 512)
    diagnosis = [("special", {"check": "chunked_fault"}, lambda: chunked_fault_case(torch, pk, device))] * (
        "triton" in backends) + [("special", {"check": f"{be}_variants"},
                                  partial(variants_case, torch, pk, device, be, size=variant_size)) for be in backends
                                 if be != "cpp"]
    # (the diagnosis before the stream and > 2^31 checks, which passed in run 3: it decides the next defaults)
    tasks = first + diagnosis + [
        ("special", {"check": "stream"}, lambda: stream_case(torch, pk, backends, device)),
        ("special", {"check": "large_bf16"}, lambda: large_case(backends, args, step))] + \
        sorted(rest, key=lambda t: turn[id(t)])

    for kind, meta, run in tasks:
        if step.out_of_time():
            entry = dict(meta, device=dev, status="skipped", reason="step budget reached")
        else:
            t0 = now()
            try:
                result = run()
                if kind == "row":
                    ok = all(v["ok"] for v in result.values())
                    entry = dict(meta, device=dev, status="ok" if ok else "failed", checks=result)
                else:
                    entry = dict(meta, device=dev, **result)
            except Exception as err:  # noqa: BLE001
                entry = dict(meta, device=dev, status="failed", reason=f"{type(err).__name__}: {str(err)[:400]}")
            entry["seconds"] = round(now() - t0, 2)
            release(torch)
        step.data["rows" if kind == "row" else "special"].append(entry)
        step.save()

    status, reason = correctness_outcome(step.data["rows"], step.data["special"], backends, missing)
    step.done(status, reason)
    print(reason)


def correctness_outcome(rows: list, special: list, backends: list, missing: list) -> tuple[str, str]:
    """The correctness step's status and line. chunked_fault diagnoses a known fault (README, Limits): its
    variants' outcomes are reported, and do not fail the kernels' checks."""
    fault = [e for e in special if e.get("check") == "chunked_fault"]
    entries = [e for e in rows + special if e not in fault]
    failed = [e for e in entries if e.get("status") == "failed"]
    ran = [e for e in entries if e.get("status") != "skipped"]
    reason = f"{len(ran) - len(failed)}/{len(ran)} checks pass ({', '.join(backends) or 'no kernel backend'})"
    for e in fault:
        wrong = failing_variants(variant_outcomes(e))
        reason += f"; chunked_fault (diagnosis): {e.get('status')}" + (f", wrong: {', '.join(wrong)}" if wrong else "")
    if missing:
        reason += f"; not available: {', '.join(missing)}"
    if failed:
        first = failed[0]
        reason += f"; first failure: {first.get('backend', '')} {first.get('case', first.get('check'))} " \
                  f"{first.get('dtype', '')}"
    return ("failed" if failed or not backends else "ok"), reason


def large_case(backends, args, step: Step) -> dict:
    """B*M*D > 2^31 elements in bfloat16 (forward gram_svd only): int32 offsets would wrap. One subprocess per
    backend: a kernel that faults there ends every later CUDA call of its process, and must not hide the other
    backend's result."""
    res: dict[str, Any] = {"backends": {}}
    for be in backends:
        cmd = [sys.executable, str(Path(__file__).absolute()), "large", "--backend", be, "--out", str(args.out),
               "--steps", str(args.steps)] + (["--dry-run"] if args.dry_run else [])
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=max(5.0, step.left() - 2))
            sys.stderr.write(r.stderr[-4000:])
            try:
                got = json.loads(r.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                got = {"error": f"rc {r.returncode}: " + " | ".join(r.stderr.strip().splitlines()[-3:])[-400:]}
        except subprocess.TimeoutExpired:
            got = {"error": "timed out (step budget)"}
        for key in ("B", "M", "D", "dtype", "elements", "over_2_31", "instances_checked"):
            if key in got:
                res[key] = got.pop(key)
        res["backends"][be] = got.get("checks", got)
    ok = all("error" not in v and all(c["ok"] for c in v.values()) for v in res["backends"].values())
    res["status"] = "ok" if ok and res["backends"] else "failed"
    return res


def cmd_large(args):
    """One backend of the large case (see large_case); prints its result as JSON on the last line. Instances
    are independent, so a subset is checked against the float64 reference computed on that subset alone."""
    torch = _torch()
    import pmrl_kernels as pk  # noqa: PLC0415
    device = torch.device("cpu" if args.dry_run else "cuda")
    if args.dry_run:
        b, m, d, n_random = 300, 4, 20, 24  # the same code path at a size the CPU handles
    else:
        b, m, d, n_random = 2**20 + 3, 4, 520, 200
    res: dict[str, Any] = {"B": b, "M": m, "D": d, "dtype": "bfloat16", "elements": b * m * d,
                           "over_2_31": b * m * d > 2**31}
    try:
        x = torch.empty(b, m, d, dtype=torch.bfloat16, device=device)
        g = torch.Generator(device=device).manual_seed(5)
        chunk = max(1, 2**27 // (m * d))
        for i in range(0, b, chunk):  # chunked: no single generator call over 2^31 elements
            x[i:i + chunk].normal_(generator=g)
        rng = random.Random(5)
        # random instances, both ends, and the instances around element offset 2^31 (where int32 wraps)
        edge = 2**31 // (m * d)
        idx = set(rng.sample(range(b), min(n_random, b))) | set(range(4)) | set(range(b - 8, b))
        idx |= {i for i in range(edge - 3, edge + 4) if 0 <= i < b}
        idx_t = torch.tensor(sorted(idx), device=device)
        res["instances_checked"] = len(idx)
        ref = pk.gram_svd(x[idx_t].double(), backend="reference")
        base = pk.gram_svd(x[idx_t], backend="reference")
        with torch.no_grad():
            out = pk.gram_svd(x, backend=args.backend)
        s, lead = out.S[idx_t], out.lead[idx_t]
        res["checks"] = {
            "S": verdict(rel_err(s, ref.S), THRESHOLDS["bfloat16"]["S"], rel_err(base.S, ref.S)),
            "lead": verdict(rel_err(lead, ref.lead), THRESHOLDS["bfloat16"]["lead"], rel_err(base.lead, ref.lead)),
        }
    except Exception as err:  # noqa: BLE001
        res["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    print(json.dumps(_clean(res)))


def _verdicts_or_error(fn) -> dict:
    """fn(), a backend's verdicts, or {"error": ...} when it raised."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001
        return {"error": f"{type(err).__name__}: {str(err)[:300]}"}


def variant_outcomes(res: dict) -> dict:
    """{backend or variant: "ok", "wrong" or its error} of a result that compared several (chunked_fault_case,
    variants_case, stream_case)."""
    return {name: v["error"] if "error" in v else "ok" if all(c["ok"] for c in v.values()) else "wrong"
            for name, v in res.get("backends", {}).items()}


def failing_variants(outcomes: dict) -> list:
    return [name for name, outcome in outcomes.items() if outcome != "ok"]


def _with_status(res: dict) -> dict:
    """res with status "ok" when it compared some backend and every one's verdicts passed, else "failed"."""
    outcomes = variant_outcomes(res)
    res["status"] = "ok" if outcomes and not failing_variants(outcomes) else "failed"
    return res


def stream_case(torch, pk, backends, device) -> dict:
    """The kernels must run on the current stream: the same call on a side stream, whose input is written on
    that stream after a spin, must give the default-stream result (a kernel on the wrong stream reads early)."""
    if device.type != "cuda":
        return {"status": "skipped", "reason": "no CUDA stream on the CPU"}
    res = {"B": 4096, "M": 4, "D": 512, "dtype": "float32", "backends": {}}
    x = seeded_randn(torch, (4096, 4, 512), 21, device, torch.float32)

    def run(inp, be):
        emb = [t.requires_grad_() for t in inp.clone().unbind(1)]
        out = pk.gram_svd(emb, backend=be)
        loss = pk.pmrl_loss(emb, tau=TAU, tau_reg=TAU_REG, backend=be)
        grads = torch.autograd.grad(loss, emb)
        return {"S": out.S.detach(), "lead": out.lead.detach(), "loss": loss.detach(),
                "grad_loss": torch.stack(grads, 1)}

    def compare(be):
        expected = run(x, be)
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            torch.cuda._sleep(20_000_000)  # ~10 ms of spinning before the input exists on this stream
            got = run(x * 1.0, be)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        return {q: verdict(rel_err(got[q], expected[q]), THRESHOLDS["float32"][_threshold_key(q)]) for q in expected}

    for be in backends:
        res["backends"][be] = _verdicts_or_error(lambda be=be: compare(be))
    return _with_status(res)


def variants_case(torch, pk, device, kind: str, backend: Optional[str] = None, size=(4096, 4, 512)) -> dict:
    """The timed variants of a kernel backend against the float64 reference (compare_case: S, U, lead, the loss, both
    gradients) on the benchmark's M and D at B = 4096: kind "cuda", the lane counts of CUDA_VARIANTS in fp32 and
    bf16; kind "triton", the TRITON_VARIANTS that launch other kernels than "triton" at this size (path, warps,
    Jacobi ordering), fp32. A variant is timed only if it is right too; `backend` (default: kind) runs them."""
    backend = backend or kind
    _, m, d = size
    if kind == "cuda":
        variants = {name: partial(with_env, env=env) for name, env in CUDA_VARIANTS.items()}
        dtypes = ("float32", "bfloat16")
    else:
        variants = {name: partial(triton_variant, provider=name) for name in TRITON_VARIANTS
                    if variant_differs(name, m, d, "float32")}
        dtypes = ("float32",)
    res: dict[str, Any] = dict(zip("BMD", size), dtype="+".join(dtypes), backends={})
    for name, wrap in variants.items():
        for dt in dtypes:
            x = seeded_randn(torch, size, 10, device, dtype_of(torch, dt))
            res["backends"][f"{name}:{dt}"] = _verdicts_or_error(wrap(lambda x=x: compare_case(
                torch, pk, x, backend=backend, layout="list", normalize=True, grad_s_top_only=False, seed=0)))
    return _with_status(res)


def chunked_fault_case(torch, pk, device) -> dict:
    """Triton's chunked fp32 forward wrote wrong U columns on the H200 (README, Limits) for this input, a 7 x 3 x 33
    [B, M, D] view (row stride 99), as tests/test_triton.py's test_chunked_forward_with_the_compiled_block_sizes.
    Run through the chunked path in variants that separate the suspects: as it ran (16 instances and 16 features a
    program, 4 warps), at 2 warps, 8 instances a program, the rows at a 16-aligned stride (a view into a [B, M, 48]
    buffer), and the one pass; S and U against the float64 reference."""
    from pmrl_kernels.ops import triton_gram  # noqa: PLC0415

    x64 = torch.randn(7, 3, 33, generator=torch.Generator().manual_seed(763), dtype=torch.float64)
    padded = torch.zeros(7, 3, 48, dtype=torch.float32, device=device)
    padded[..., :33] = x64.to(padded)
    exact = pk.gram_svd(x64, backend="reference")
    cols = defined_columns(torch, exact.S, exact.U)

    def config(block_b, block_d, resident):
        return lambda *args: dict(BLOCK_B=block_b, BLOCK_D=block_d, RESIDENT=resident)

    variants = {"chunked": ({"launch_config": config(16, 16, False)}, None),
                "chunked-2-warps": ({"launch_config": config(16, 16, False), "NUM_WARPS": 2}, None),
                "chunked-8-instances": ({"launch_config": config(8, 16, False)}, None),
                "chunked-aligned-stride": ({"launch_config": config(16, 16, False)}, padded[..., :33]),
                "one-pass": ({"launch_config": config(8, 64, True)}, None)}
    res: dict[str, Any] = {"B": 7, "M": 3, "D": 33, "dtype": "float32", "backends": {}}
    def compare(z):
        out = pk.gram_svd(list(z.unbind(1)), backend="triton")
        return {"S": verdict(rel_err(out.S, exact.S), THRESHOLDS["float32"]["S"]),
                "U": verdict(rel_err(out.U.transpose(1, 2)[cols.to(out.U.device)], exact.U.transpose(1, 2)[cols]),
                             THRESHOLDS["float32"]["U"])}

    for name, (knobs, z) in variants.items():
        z = x64.to(device, torch.float32) if z is None else z
        # under compute-sanitizer, a marker and a finished kernel before the next: its hazards print above the
        # next variant's marker, so the log says which variant they belong to
        print(f"== chunked_fault variant {name}", flush=True)
        res["backends"][name] = _verdicts_or_error(with_knobs(lambda z=z: compare(z), triton_gram, knobs))
        if device.type == "cuda":
            torch.cuda.synchronize()
    return _with_status(res)


# ----------------------------------------------------------------------------------------------- bench

class Bencher:
    """Times a call alike for every provider: triton.testing.do_bench (median, L2 flushed) on the GPU, or a
    median of host-clock calls for slow cells and on the CPU."""

    def __init__(self, torch, device):
        self.torch, self.device = torch, device
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def once(self, fn) -> tuple[float, Optional[int]]:
        """Host seconds and peak extra device bytes of one call."""
        torch = self.torch
        self.sync()
        base = None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fn()
        self.sync()
        sec = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() - base if self.cuda else None
        return sec, peak

    def median_ms(self, fn, call_s: float) -> tuple[float, str]:
        if self.cuda and call_s < 0.25:
            from triton.testing import do_bench  # noqa: PLC0415
            return float(do_bench(fn, warmup=25, rep=100, return_mode="median")), "triton.testing.do_bench median"
        # on the CPU the call that measured call_s is a sample too; more samples only where they are cheap
        n = 3 if self.cuda else (4 if call_s < 0.05 else 1)
        if self.cuda:
            torch = self.torch
            ev = []
            for _ in range(n):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                ev.append((a, b))
            torch.cuda.synchronize()
            return statistics.median(a.elapsed_time(b) for a, b in ev), f"median of {n} (CUDA events)"
        times = [call_s]
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3, f"median of {n + 1} (perf_counter)"


def bench_cell(bencher: Bencher, fn, cap_s: float) -> dict:
    """Warm-up (JIT) call, a call for time and peak memory, then the median; skipped after one slow call."""
    torch = bencher.torch
    try:
        if bencher.cuda:
            bencher.once(fn)  # JIT, cuBLAS/cuSOLVER handles, allocator: not part of the measurement
        sec, peak = bencher.once(fn)
        if sec > cap_s:
            return {"status": "skipped", "reason": f"one call took {sec:.2f} s (cap {cap_s:g} s)",
                    "single_call_ms": sec * 1e3, "peak_mem_mb": None if peak is None else peak / 2**20}
        ms, timer = bencher.median_ms(fn, sec)
        return {"status": "ok", "median_ms": ms, "timer": timer,
                "peak_mem_mb": None if peak is None else peak / 2**20}
    except torch.cuda.OutOfMemoryError as err:
        return {"status": "skipped", "reason": f"OOM: {str(err)[:160]}"}
    except Exception as err:  # noqa: BLE001
        return {"status": "failed", "reason": f"{type(err).__name__}: {str(err)[:300]}"}
    finally:
        release(torch)


# the Triton gram kernels' variants side by side: launch_config's choice ("triton"), the chunked passes alone,
# launch_config's choice at 1 and 2 warps a program
# (sm_90 without spills at M = 4 and 16 for 2, at M = 4 only for 1), and the forward's Jacobi sweeps in either
# ordering where "triton" takes the other one (the cyclic one up to CYCLIC_JACOBI_MAX_M, the parallel one above)
TRITON_VARIANTS = {"triton-chunked": {"RESIDENT_ELEMENTS": 0},
                "triton-1-warp": {"NUM_WARPS": 1}, "triton-2-warps": {"NUM_WARPS": 2},
                "triton-cyclic": {"CYCLIC_JACOBI_MAX_M": 16},  # 16: every M the kernels take
                "triton-parallel": {"CYCLIC_JACOBI_MAX_M": 0}}


# the CUDA kernels at fewer lanes an instance than launch's 32 at D = 512 (pmrl::lanes_per_instance): each lane
# repeats its instance's eigen-solve, 43% of the forward at M = 4 on the H200, so 8 or 4 lanes solve 4 or 8
# instances a warp at once (PMRL_CUDA_MAX_LANES, read at each launch)
CUDA_VARIANTS = {"cuda-8-lanes": {"PMRL_CUDA_MAX_LANES": "8"}, "cuda-4-lanes": {"PMRL_CUDA_MAX_LANES": "4"}}


def with_env(fn, env: dict):
    """fn run with these environment variables set, then put back: only these (mock.patch.dict would rebuild the
    whole environment on every call, host time inside the timed region of a sub-millisecond kernel)."""
    def run():
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return run


def static_check_module():
    """benchmarks/static_check.py, whose recorder replays the package's launchers without running a kernel."""
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    import static_check  # noqa: PLC0415

    return static_check


def gram_launches(m: int, d: int, dtype: str) -> list:
    """(grid, keyword arguments) of the Triton gram forward and backward launches for M modalities of D features,
    recorded, not run (4 instances: the launch configuration does not depend on B)."""
    spec = dict(m=m, d=d, dtype=dtype, normalize=True)
    return [(grid, kwargs) for _, grid, _, kwargs in static_check_module()._gram_launches(spec, batch=4)]


def variant_differs(provider: str, m: int, d: int, dtype: str) -> bool:
    """Whether TRITON_VARIANTS[provider] launches other kernels than "triton" at this size (the ordering variants
    only where "triton" takes the other ordering, the path variants not at M = 16, D = 512, chunked either way): a
    cell that would time "triton" again is left out."""
    return triton_variant(lambda: gram_launches(m, d, dtype), provider)() != gram_launches(m, d, dtype)


def with_knobs(fn, module, knobs: dict):
    """fn run with the module's knobs (module-level constants its launchers read) set to knobs, then put back."""
    return mock.patch.multiple(module, **knobs)(fn)


def triton_variant(fn, provider: str):
    """fn run with the Triton gram module's knobs set as TRITON_VARIANTS[provider] says."""
    from pmrl_kernels.ops import triton_gram  # noqa: PLC0415

    return with_knobs(fn, triton_gram, TRITON_VARIANTS[provider])


# the contrastive term's matmul precision, as torch would choose it: float32_matmul_precision "highest" (IEEE fp32),
# "high" (TF32), or bf16 operands under torch.autocast
CONTRASTIVE_PRECISIONS = ("ieee", "tf32", "bf16")
CONTRASTIVE_BACKENDS = ("triton", "blocked")


def at_precision(fn, precision: str, device_type: str):
    """fn run under the torch settings that make the contrastive kernel use `precision`."""
    torch = _torch()

    def run():
        if precision == "bf16":
            with torch.autocast(device_type, dtype=torch.bfloat16):
                return fn()
        saved = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
        try:
            return fn()
        finally:
            torch.set_float32_matmul_precision(saved)
    return run


# the forward on rows with disjoint feature supports (disjoint_rows): the same bytes as on random rows, but a
# diagonal Gram matrix, on which the Jacobi solve stops at its first test without a rotation. Beside the random
# rows' time it says what the eigen-solve costs: every lane of a CUDA instance runs it, and spreading it over the
# lanes (instances solved side by side) pays only if this share is large
DIAGONAL = "-diag"


def disjoint_rows(torch, zs):
    """zs with row k kept on the k-th of M equal blocks of features and zeroed elsewhere (no gradient)."""
    m, d = len(zs), zs[0].shape[1]
    block = torch.arange(d, device=zs[0].device) * m // d
    return [(z.detach() * (block == k).to(z.dtype)).contiguous() for k, z in enumerate(zs)]


def cmd_bench(args):
    step = Step(args.steps, "bench", args.budget, margin=2 if args.dry_run else 5)
    torch, pk, device, backends, _ = kernel_setup(args)
    dev = device_name(torch, device)
    bencher = Bencher(torch, device)
    copy = copy_gbps_from(args.steps)
    if copy is None:
        copy = measure_copy(torch, device, (64 if args.dry_run else 1024) * 2**20)["copy_gbps"]
    if args.dry_run:
        b_size, ms_, d_size, cap, probe_b = 64, (4,), 32, 5.0, 16
    else:
        b_size, ms_, d_size, cap, probe_b = 65536, (4, 16), 512, 2.0, 256
    recipe = recipe_fn()
    step.data.update(device=dev, copy_gbps=copy, B=b_size, D=d_size, backends=backends, cap_s=cap,
                     float32_matmul_precision=torch.get_float32_matmul_precision(),
                     floor="fwd: read Z once; fwd+bwd: read Z twice + write dZ once (outputs and the B x B "
                           "contrastive work not counted)",
                     inputs="M separate [B, D] tensors requiring grad", rows=[])

    def add(row):
        row.update(device=dev, B=b_size, D=d_size)
        z_bytes = b_size * row["M"] * d_size * dtype_of(torch, row["dtype"]).itemsize
        row["floor_bytes"] = z_bytes * (1 if row["mode"] == "fwd" else 3)
        if row.get("median_ms"):
            row["gbps"] = row["floor_bytes"] / (row["median_ms"] / 1e3) / 1e9
            row["copy_fraction"] = row["gbps"] / copy if copy else None
        step.data["rows"].append(row)
        step.save()

    inputs: dict[tuple, tuple] = {}

    def inputs_for(m, dt):
        """M separate [B, D] leaves (generated on the device: 2 GiB at M=16) and fixed output gradients."""
        if (m, dt) not in inputs:
            gen = torch.Generator(device=device).manual_seed(3)
            zs = [torch.randn(b_size, d_size, generator=gen, device=device).to(dtype_of(torch, dt))
                  .requires_grad_() for _ in range(m)]
            gs = torch.randn(b_size, m, generator=gen, device=device)
            gl = torch.randn(b_size, d_size, generator=gen, device=device)
            inputs[(m, dt)] = (zs, gs, gl)
        return inputs[(m, dt)]

    def run_cells(cells, **size):
        for cell, fn in cells:
            row = dict(cell, **size)
            if step.out_of_time():
                row.update(status="skipped", reason="step budget reached")
            else:
                row.update(bench_cell(bencher, fn, cap))
            add(row)

    # float32 at every M first: the cells that decide the defaults (lanes, warps, ordering) come before a short
    # budget runs out
    sizes = [(m, dt) for dt in ("float32", "bfloat16") for m in ms_]
    # the kernels at every size first, the published recipe last: a short budget cuts the baseline, not them
    for m, dt in sizes:
        zs, gs, gl = inputs_for(m, dt)
        cells = []
        for be in backends:
            if args.dry_run and be == "triton" and dt != "float32":
                continue  # the interpreter takes about a second a call: float32 only in the dry run
            gram = [(dict(target="gram_svd", mode="fwd", provider=be),
                     lambda be=be, zs=zs: pk.gram_svd(zs, backend=be)),
                    (dict(target="gram_svd", mode="fwd+bwd", provider=be),
                     lambda be=be, zs=zs, g=(gs, gl): torch.autograd.grad(
                         pk.gram_svd(zs, backend=be)[::2], zs, list(g)))]
            cells += gram
            cells.append((dict(target="gram_svd", mode="fwd", provider=be + DIAGONAL),
                          lambda be=be, zd=disjoint_rows(torch, zs): pk.gram_svd(zd, backend=be)))
            if be == "triton":  # the other paths at the same size: which is the faster here?
                cells += [(dict(c, provider=p), triton_variant(fn, p)) for p in TRITON_VARIANTS
                          if variant_differs(p, m, zs[0].shape[1], dt) for c, fn in gram]
            if be == "cuda" and m <= 8:  # fewer lanes an instance (where auto takes cuda)
                cells += [(dict(c, provider=p), with_env(fn, env)) for p, env in CUDA_VARIANTS.items()
                          for c, fn in gram]
            cells.append((dict(target="loss", mode="fwd+bwd", provider=be, reg_weight=0.0),
                          lambda be=be, zs=zs: torch.autograd.grad(
                              pk.pmrl_loss(zs, tau=TAU, tau_reg=TAU_REG, reg_weight=0.0, backend=be), zs)))
        if not args.dry_run:  # the torch composition (torch.linalg.eigh of the Gram matrices): the baseline
            cells.append((dict(target="gram_svd", mode="fwd", provider="torch"),
                          lambda zs=zs: pk.gram_svd(zs, backend="reference")))
            cells.append((dict(target="gram_svd", mode="fwd+bwd", provider="torch"),
                          lambda zs=zs, g=(gs, gl): torch.autograd.grad(
                              pk.gram_svd(zs, backend="reference")[::2], zs, list(g))))
        run_cells(cells, dtype=dt, M=m)
    # the B x B contrastive term does not depend on M: once, at the first M in float32, after the Gram cells (a
    # call takes 0.1 to 2 s), by both its CUDA backends (Triton's kernels, and torch.mm in row blocks, with the
    # gram_eig op "auto" picks) in each precision torch would use for its matmul (CPU dry run: IEEE only)
    if "triton" in backends:
        zs = inputs_for(ms_[0], "float32")[0]

        def loss_reg1(zs=zs, provider="triton"):
            return torch.autograd.grad(
                pk.pmrl_loss(zs, tau=TAU, tau_reg=TAU_REG, reg_weight=1.0, backend=provider), zs)

        run_cells([(dict(target="loss", mode="fwd+bwd", provider=p, reg_weight=1.0, precision=precision),
                    at_precision(partial(loss_reg1, provider=p), precision, device.type))
                   for precision in (("ieee",) if args.dry_run else CONTRASTIVE_PRECISIONS)
                   for p in CONTRASTIVE_BACKENDS], dtype="float32", M=ms_[0])
    for m, dt in sizes:
        zs, _, _ = inputs_for(m, dt)
        probe = None
        for reg in (0.0, 1.0):
            row = dict(target="loss", mode="fwd+bwd", provider="recipe", reg_weight=reg, dtype=dt, M=m,
                       note="float32 maths for 16-bit input (torch.linalg.svd takes no bfloat16)")
            if step.out_of_time():
                row.update(status="skipped", reason="step budget reached")
            else:
                probe = probe or recipe_probe(torch, bencher, recipe, zs, probe_b)
                row.update(recipe_cell(torch, bencher, recipe, zs, reg, probe, cap))
            add(row)
    inputs.clear()
    rows = step.data["rows"]
    failed = [r for r in rows if r["status"] == "failed"]
    ok = [r for r in rows if r["status"] == "ok"]
    step.done("failed" if failed or not backends else "ok",
              f"{len(ok)} timed, {len(rows) - len(ok) - len(failed)} skipped, {len(failed)} failed cells on {dev}")


def _recipe_fn(torch, recipe, inputs, reg: float):
    cd = torch.float64 if inputs[0].dtype == torch.float64 else torch.float32  # svd takes no 16-bit input
    return lambda: torch.autograd.grad(
        recipe([z.to(cd) for z in inputs], tau=TAU, tau_reg=TAU_REG, reg_weight=reg), inputs)


def recipe_probe(torch, bencher: Bencher, recipe, zs, probe_b: int) -> dict:
    """One call of the published recipe at small B (its full SVD materialises U [B, D, D] and may loop over the
    instances on the GPU, and a CUDA call cannot be interrupted): the full-size cells are predicted from it."""
    probe = [z[:probe_b].detach().clone().requires_grad_() for z in zs]
    try:
        if bencher.cuda:
            bencher.once(_recipe_fn(torch, recipe, probe, 1.0))
        sec, peak = bencher.once(_recipe_fn(torch, recipe, probe, 1.0))
        return {"probe_B": probe_b, "probe_ms": sec * 1e3, "probe_peak_mb": None if peak is None else peak / 2**20}
    except Exception as err:  # noqa: BLE001
        return {"probe_B": probe_b, "error": f"{type(err).__name__}: {str(err)[:200]}"}


def recipe_cell(torch, bencher: Bencher, recipe, zs, reg: float, probe: dict, cap: float) -> dict:
    """The recipe at full size, unless the probe predicts a call over the cap or over the free memory."""
    b = zs[0].shape[0]
    if "error" in probe:
        return dict(probe, status="failed", reason=f"probe at B={probe['probe_B']}: {probe['error']}")
    scale = b / probe["probe_B"]
    pred = dict(probe, predicted_s=probe["probe_ms"] / 1e3 * scale)
    if bencher.cuda:
        # peak scales with B, plus the B x B logits, their softmax and gradient when reg_weight > 0
        pred_bytes = (probe["probe_peak_mb"] or 0) * 2**20 * scale + (3 * b * b * 4 if reg else 0)
        free = torch.cuda.mem_get_info()[0]
        pred["predicted_mem_gib"] = pred_bytes / 2**30
        if pred_bytes > 0.85 * free:
            return dict(pred, status="skipped", reason=f"predicted {pred_bytes / 2**30:.0f} GiB from "
                                                       f"B={probe['probe_B']} (free {free / 2**30:.0f} GiB)")
    if pred["predicted_s"] > cap:
        return dict(pred, status="skipped", reason=f"predicted {pred['predicted_s']:.1f} s a call from "
                                                   f"B={probe['probe_B']} ({probe['probe_ms']:.1f} ms; cap {cap:g} s)")
    return dict(pred, **bench_cell(bencher, _recipe_fn(torch, recipe, zs, reg), cap))


def cmd_bench_cli(args):
    """A small explicit sweep of the package's own bench CLI (its JSON is merged into bench.json)."""
    step = Step(args.steps, "bench_cli", args.budget)
    torch = _torch()
    import pmrl_kernels as pk  # noqa: PLC0415
    providers = ["torch", "svd"] + [b for b in KERNEL_BACKENDS_GPU if b in pk.available_backends("cuda")]
    out = args.steps / "bench_cli_rows.json"
    cmd = [sys.executable, "-m", "pmrl_kernels.bench", "--sizes", "B=16384;M=4;D=512", "--dtype", "fp32",
           "--targets", "gram_svd,loss", "--modes", "full", "--providers", ",".join(providers),
           "--repeats", "10", "--time-limit", "1", "--no-progress", "--no-save", "--json", str(out)]
    step.data.update(command=" ".join(cmd), device=torch.cuda.get_device_name(0))
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10, step.left() - 5))
        sys.stdout.write(r.stdout[-20000:])
        sys.stderr.write(r.stderr[-20000:])
        step.data["rc"] = r.returncode
        rows = read_json(out, [])
        step.data["rows"] = rows
        step.done("ok" if r.returncode == 0 else "failed", f"{len(rows)} rows (rc {r.returncode})")
    except subprocess.TimeoutExpired:
        step.done("failed", "timed out")


# ----------------------------------------------------------------------------------------------- ncu

def cmd_ncu_driver(args):
    """Runs under `ncu --profile-from-start off`: warm-up (JIT) unprofiled, then for each backend one forward
    and one backward inside cudaProfilerStart/Stop. A torch.cuda._sleep kernel (spin_kernel) marks the start of
    each phase, so the parser can attribute kernels whatever their names are."""
    torch = _torch()
    import pmrl_kernels as pk  # noqa: PLC0415
    b, m, d = 65536, 4, 512
    backends = [x for x in KERNEL_BACKENDS_GPU if x in pk.available_backends("cuda")]
    gen = torch.Generator(device="cuda").manual_seed(9)
    zs = [torch.randn(b, d, generator=gen, device="cuda").requires_grad_() for _ in range(m)]
    gs, gl = torch.randn(b, m, device="cuda"), torch.randn(b, d, device="cuda")
    for be in backends:  # JIT and caches, outside the profiled range
        out = pk.gram_svd(zs, backend=be)
        torch.autograd.grad([out.S, out.lead], zs, [gs, gl])
    torch.cuda.synchronize()
    phases = []
    torch.cuda.profiler.start()
    for be in backends:
        torch.cuda._sleep(1000)
        out = pk.gram_svd(zs, backend=be)
        torch.cuda.synchronize()
        phases.append({"backend": be, "pass": "fwd"})
        torch.cuda._sleep(1000)
        torch.autograd.grad([out.S, out.lead], zs, [gs, gl])
        torch.cuda.synchronize()
        phases.append({"backend": be, "pass": "bwd"})
    torch.cuda.profiler.stop()
    write_json(args.steps / "ncu_phases.json", {"device": torch.cuda.get_device_name(0), "B": b, "M": m, "D": d,
                                                "dtype": "float32", "phases": phases})


_UNITS = {"byte": 1, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "tbyte": 1e12, "kb": 1e3, "mb": 1e6, "gb": 1e9,
          "nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1.0, "ns": 1e-9, "us": 1e-6, "ms": 1e-3,
          "s": 1.0}


def parse_ncu_csv(text: str) -> list[dict]:
    """Kernels (in launch order) with their metrics in bytes and seconds, from `ncu --csv` output mixed with
    the program's own lines."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"ID"')), None)
    if start is None:
        return []
    kernels: dict[str, dict] = {}
    for r in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        if r.get("ID") == "ID" or not r.get("Metric Name"):
            continue
        k = kernels.setdefault(r["ID"], {"id": int(r["ID"]) if r["ID"].isdigit() else r["ID"],
                                         "kernel": r.get("Kernel Name", "?"), "grid": r.get("Grid Size"),
                                         "block": r.get("Block Size"), "metrics": {}})
        try:
            value = float(r["Metric Value"].replace(",", ""))
        except ValueError:
            continue
        unit = (r.get("Metric Unit") or "").strip().lower()
        k["metrics"][r["Metric Name"]] = value * _UNITS.get(unit, 1.0)
    return sorted(kernels.values(), key=lambda k: k["id"] if isinstance(k["id"], int) else 0)


# beside the bytes (gpu_check.sh's NCU_METRICS): the busiest SM pipe and the achieved occupancy in % of their
# peaks, warp instructions executed, registers a thread
NCU_SM_METRICS = {"sm_pct": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
                  "occupancy_pct": "sm__warps_active.avg.pct_of_peak_sustained_active",
                  "warp_instructions": "smsp__inst_executed.sum", "registers": "launch__registers_per_thread"}


def ncu_rows(kernels: list[dict], phases: list[dict], b: int, m: int, d: int) -> list[dict]:
    """Attribute kernels to phases by the spin_kernel markers, and add bytes over the floor."""
    z_bytes = b * m * d * 4
    rows, phase = [], -1
    for k in kernels:
        if "spin" in k["kernel"]:
            phase += 1
            continue
        p = phases[phase] if 0 <= phase < len(phases) else {"backend": "?", "pass": "?"}
        read = k["metrics"].get("dram__bytes_read.sum")
        write = k["metrics"].get("dram__bytes_write.sum")
        t = k["metrics"].get("gpu__time_duration.sum")
        floor = z_bytes if p["pass"] == "fwd" else 2 * z_bytes  # fwd: read Z; bwd: read Z, write dZ
        row = dict(backend=p["backend"], pass_=p["pass"], kernel=k["kernel"][:80], grid=k["grid"], block=k["block"],
                   dram_read_bytes=read, dram_write_bytes=write, time_s=t, floor_bytes=floor,
                   **{name: k["metrics"].get(metric) for name, metric in NCU_SM_METRICS.items()})
        if read is not None and write is not None:
            row["bytes_over_floor"] = (read + write) / floor
            if t:
                row["dram_gbps"] = (read + write) / t / 1e9
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------- finish

def read_runs(steps: Path) -> list[dict]:
    """Commands bash ran: tag, rc, seconds, budget, log (benchmarks/gpu_check.sh appends to runs.tsv)."""
    rows = []
    try:
        with open(steps / "runs.tsv") as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 5:
                    rows.append({"tag": parts[0], "rc": int(parts[1]), "seconds": float(parts[2]),
                                 "budget_s": float(parts[3]), "log": parts[4]})
    except OSError:
        pass
    return rows


def _timed_out(rc: int) -> bool:
    return rc in (124, 137)


def _last_error(path: str) -> str:
    """The last exception line (or error line) of a log: what a crashed step died of."""
    lines = [ln for ln in _tail(path, 400) if not ln.startswith("=")]  # not the sanitizer's/ncu's own lines
    for pat in (r"^\w+(\.\w+)*(Error|Exception|Interrupt)\b", r"error", r"\S"):
        hit = [ln for ln in lines if re.search(pat, ln, re.I if pat == "error" else 0)]
        if hit:
            return hit[-1].strip()[:240]
    return ""


def _tail(path: str, n: int = 15) -> list[str]:
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()[-n:]
    except OSError:
        return []


def parse_build(steps: Path, run: dict, data: dict) -> tuple[str, str]:
    log = Path(run["log"]).read_text(errors="replace") if Path(run["log"]).exists() else ""
    runs = [r for r in read_runs(steps) if r["tag"] == "build"]
    data["build_seconds"] = round(sum(r["seconds"] for r in runs), 1)
    data["fallback"] = "python setup.py build_ext --inplace (pip failed at once)" if len(runs) > 1 else None
    data["nvcc_warnings"] = len(re.findall(r"warning #?\w*", log))
    data["compiled_cuda_files"] = sorted(set(re.findall(r"([\w/]+\.cu)\b", log)))[:20]
    probe = subprocess.run(
        [sys.executable, "-c", "import json, torch, pmrl_kernels as pk; from torch.utils import cpp_extension as ce;"
         "print(json.dumps({'cuda': pk.available_backends('cuda') if torch.cuda.is_available() else [],"
         "'cpu': pk.available_backends('cpu'), 'CUDA_HOME': ce.CUDA_HOME}))"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    try:
        found = json.loads(probe.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        found = {"error": (probe.stderr or probe.stdout)[-600:]}
    data["available_backends"] = found
    cuda_ok = "cuda" in found.get("cuda", [])
    data["cuda_backend_available"] = cuda_ok
    if run["rc"] != 0:
        errors = [ln for ln in log.splitlines() if re.search(r"error|Error|ERROR", ln)][-8:]
        data["errors"] = errors or _tail(run["log"])
        why = "timed out" if _timed_out(run["rc"]) else f"rc {run['rc']}"
        return "failed", f"{why} after {data['build_seconds']:.0f} s; cuda backend {'' if cuda_ok else 'NOT '}" \
                         f"available; {(data['errors'] or [''])[-1][:160]}"
    if not cuda_ok:
        return "failed", f"built in {run['seconds']:.0f} s but 'cuda' is not in available_backends('cuda'): {found}"
    return "ok", f"{data['build_seconds']:.0f} s{' (fallback in place)' if data['fallback'] else ''}; " \
                 f"available_backends('cuda') = {found.get('cuda')}"


_SAN_KERNEL = re.compile(r"Invalid __\w+__ (read|write|atomic)|Misaligned|Out of range|Barrier error|"
                         r"Race reported|Uninitialized|Illegal|divergent", re.I)


_RACE_SUMMARY = re.compile(r"RACECHECK SUMMARY:\s+(\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)")


def parse_sanitizer_log(path: str) -> dict:
    """Error counts of a compute-sanitizer log. memcheck and synccheck end a process with "ERROR SUMMARY: N errors";
    racecheck with "RACECHECK SUMMARY: H hazards displayed (E errors, W warnings)", whose errors count when no
    ERROR SUMMARY is there (warnings: hazards racecheck deems benign, such as equal values written twice)."""
    text = Path(path).read_text(errors="replace") if Path(path).exists() else ""
    summaries = [int(x) for x in re.findall(r"ERROR SUMMARY:\s+(\d+) error", text)]
    races = [tuple(map(int, r)) for r in _RACE_SUMMARY.findall(text)]
    race = {"race_hazards": sum(r[0] for r in races), "race_errors": sum(r[1] for r in races),
            "race_warnings": sum(r[2] for r in races)} if races else {}
    return {"error_summary": sum(summaries) if summaries else race.get("race_errors"),
            "summaries_found": len(summaries) or len(races),
            **race,
            "kernel_error_lines": len([ln for ln in text.splitlines() if ln.startswith("=") and
                                       _SAN_KERNEL.search(ln) and "Warning" not in ln]),
            "api_error_lines": len(re.findall(r"Program hit \w+", text)),
            "first_errors": [ln for ln in text.splitlines() if ln.startswith("=========") and
                             ("Invalid" in ln or "Program hit" in ln or "error" in ln.lower())][:8]}


def parse_sanitizer(steps: Path, runs: list[dict], data: dict) -> tuple[str, str]:
    parts, bad = [], False
    for run in runs:
        tool = run["tag"].split(":", 1)[1]
        driver = read_json(steps / f"sanitize_{tool}.json", {})
        res = {"rc": run["rc"], "seconds": run["seconds"], "budget_s": run["budget_s"],
               "timed_out": _timed_out(run["rc"]), "combos_done": driver.get("done"),
               "combos_planned": driver.get("planned"), "driver_failures": driver.get("failures", [])[:5],
               "backends": driver.get("backends"), "device": driver.get("device")}
        if tool != "plain":
            res.update(parse_sanitizer_log(run["log"]))
        if "chunked_fault" in driver:
            res["chunked_fault"] = driver["chunked_fault"].get("status") or driver["chunked_fault"].get("error")
            res["chunked_fault_wrong"] = failing_variants(variant_outcomes(driver["chunked_fault"]))
        if driver.get("status") in (None, "running"):  # it died (or never started): say of what
            res["driver_error"] = _last_error(run["log"])
        data[tool] = res
        errs = res.get("error_summary")
        api = res.get("api_error_lines") or 0
        # "Program hit cudaError... on CUDA API call" lines (torch/Triton probing the driver) count in the ERROR
        # SUMMARY too: they are reported, but only errors beyond them (kernel accesses, barriers) fail the step
        if tool != "plain" and ((errs or 0) > api or res.get("kernel_error_lines")):
            bad = True
        if res["driver_failures"] or (run["rc"] != 0 and not res["timed_out"]):
            bad = True
        label = f"{tool}: " + (f"{errs} errors ({api} API), " if tool != "plain" else "") + \
            (f"{res['race_warnings']} race warnings, " if res.get("race_warnings") else "") + \
            f"{res['combos_done']}/{res['combos_planned']} combos" + (" (timed out)" if res["timed_out"] else "") + \
            (f", chunked_fault {res['chunked_fault']}" if "chunked_fault" in res else "") + \
            (f" (wrong: {', '.join(res['chunked_fault_wrong'])})" if res.get("chunked_fault_wrong") else "") + \
            (f" rc {run['rc']}" if run["rc"] and not res["timed_out"] else "") + \
            (f" ({res['driver_error'][:100]})" if res.get("driver_error") else "")
        parts.append(label)
    if not runs:
        return "failed", "nothing ran"
    if not any(data[r["tag"].split(":", 1)[1]]["combos_done"] for r in runs):
        # seen on the H200 with 18 s for the plain run: importing torch and the first launch took the budget
        bad = True
        parts.append("no combination ran in any run")
    # a timeout leaves a partial but valid check: reported in the reason, not as a failure
    summary_missing = [t for t in ("memcheck", "racecheck", "synccheck")
                       if t in data and data[t].get("error_summary") is None and not data[t]["timed_out"]]
    if summary_missing:
        bad = True
        parts.append(f"no ERROR SUMMARY in {', '.join(summary_missing)}")
    return ("failed" if bad else "ok"), "; ".join(parts)


def parse_ncu(steps: Path, run: dict, data: dict) -> tuple[str, str]:
    text = Path(run["log"]).read_text(errors="replace") if Path(run["log"]).exists() else ""
    kernels = parse_ncu_csv(text)
    meta = read_json(steps / "ncu_phases.json", {})
    rows = ncu_rows(kernels, meta.get("phases", []), meta.get("B", 65536), meta.get("M", 4), meta.get("D", 512))
    data.update(device=meta.get("device"), B=meta.get("B"), M=meta.get("M"), D=meta.get("D"),
                dtype=meta.get("dtype"), kernels_profiled=len(kernels), rows=rows)
    # e.g. ==ERROR== ERR_NVGPUCTRPERM (no access to the performance counters in this container)
    errs = [ln for ln in text.splitlines() if ln.startswith(("==ERROR==", "==WARNING=="))][:8]
    data["ncu_messages"] = errs
    if not rows:
        errs = errs or [ln for ln in text.splitlines() if re.search(r"error", ln, re.I)][-3:] or _tail(run["log"], 3)
        why = "timed out" if _timed_out(run["rc"]) else f"rc {run['rc']}"
        return "failed", f"no kernels profiled ({why}): {(errs or ['see ncu.txt'])[0][:160]}"
    return "ok", f"{len(rows)} kernels profiled" + (f" (rc {run['rc']})" if run["rc"] else "")


def _pytest_counts(text: str) -> dict:
    """Counts of one pytest run's log: its final line, or, cut short, the per-test lines of -v
    ("[gw0] [ 3%] PASSED tests/...")."""
    counts: dict[str, Any] = {}
    final = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln) and " in " in ln]
    if final:
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", final[-1]):
            counts["errors" if what.startswith("error") else what] = int(n)
        return counts
    verdicts = re.findall(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) tests/", text)
    return {"passed": verdicts.count("PASSED"), "failed": verdicts.count("FAILED"), "errors": verdicts.count("ERROR"),
            "skipped": verdicts.count("SKIPPED"), "partial": True}


def parse_pytest(steps: Path, runs: list[dict], data: dict) -> tuple[str, str]:
    """The pytest runs of the step (one per group of test files), their counts added up."""
    counts: dict[str, Any] = {}
    named: list[str] = []
    for run in runs:
        text = Path(run["log"]).read_text(errors="replace") if Path(run["log"]).exists() else ""
        for k, v in _pytest_counts(text).items():
            counts[k] = True if k == "partial" else counts.get(k, 0) + v
        named += [m.group(0) for m in re.finditer(r"\b(?:FAILED|ERROR) tests/\S+(?: - .*)?", text)]
    data["counts"] = counts
    data["failures"] = [ln[:300] for ln in dict.fromkeys(named)][:10]
    summ = ", ".join(f"{v} {k}" for k, v in counts.items() if k != "partial")
    late = [r for r in runs if _timed_out(r["rc"])]
    if late:
        return "failed", f"timed out after {sum(r['seconds'] for r in runs):.0f} s (so far: {summ})"
    bad = [r for r in runs if r["rc"] != 0]
    if not bad:
        return "ok", summ
    return "failed", f"rc {bad[0]['rc']}: {summ}" + (f"; {data['failures'][0][:150]}" if data["failures"] else "")


def cmd_finish(args):
    """Close a step: parse its logs (steps bash ran), or check what the python step wrote against the rc
    (a timeout or a crash leaves status 'running'), then rewrite the summary."""
    name = args.step
    path = args.steps / f"{name}.json"
    data = read_json(path, {}) or {"step": name}
    data.setdefault("step", name)
    runs = [r for r in read_runs(args.steps) if r["tag"] == name or r["tag"].startswith(name + ":")]
    if args.skip:
        data.update(status="skipped", reason=args.skip)
    elif data.get("status") == "skipped":
        pass  # the step decided so itself (the dry run's sanitizer driver)
    elif name in ("build", "sanitizer", "ncu", "pytest") and not (args.dry_run and name == "sanitizer"):
        if not runs:
            data.update(status="failed", reason="no command was run")
        else:
            parser = {"build": parse_build, "ncu": parse_ncu}.get(name)
            try:
                if name in ("sanitizer", "pytest"):
                    status, reason = (parse_sanitizer if name == "sanitizer" else parse_pytest)(args.steps, runs, data)
                else:
                    status, reason = parser(args.steps, runs[-1], data)
            except Exception as err:  # noqa: BLE001
                status, reason = "failed", f"could not parse the log: {type(err).__name__}: {err}"
            data.update(status=status, reason=reason)
    elif runs:
        run = runs[-1]
        if data.get("status") in (None, "running"):
            why = f"timed out after {run['seconds']:.0f} s (budget {run['budget_s']:.0f} s)" if _timed_out(run["rc"]) \
                else f"exited with rc {run['rc']} before finishing: {_last_error(run['log'])}"
            data.update(status="failed", reason=why + "; partial results kept" * bool(len(data) > 5))
            data["log_tail"] = _tail(run["log"], 12)
        elif run["rc"] != 0 and data.get("status") == "ok":
            data.update(status="failed", reason=f"{data.get('reason', '')}; but exited with rc {run['rc']}")
    if runs:
        data["seconds"] = round(sum(r["seconds"] for r in runs), 1)
        data["budget_s"] = args.budget_s or round(sum(r["budget_s"] for r in runs), 1)
        data["runs"] = runs
    write_json(path, _clean(data))
    print(f"{name}: {data.get('status')} ({data.get('seconds', '-')} s) {str(data.get('reason', ''))[:200]}")
    cmd_summarize(args)


# ----------------------------------------------------------------------------------------------- summarize

def _f(x, spec=".3g", none="-"):
    if x is None or (isinstance(x, str)):
        return none if x is None else x
    return format(x, spec)


def bench_cell_text(r: Optional[dict]) -> str:
    """A bench row as a summary table cell: the median (and its share of the copy bandwidth), the one call over the
    cap, OOM, the predicted cost a recipe cell was skipped for, or the status (a recipe call that failed after its
    probe says failed, not its prediction)."""
    if r is None:
        return "-"
    reason = r.get("reason", "")
    if r["status"] == "ok":
        frac = r.get("copy_fraction")
        return f"{r['median_ms']:.3g}" + (f" ({100 * frac:.0f}%)" if frac else "")
    if r.get("single_call_ms") is not None:  # over the cap: the one call after the warm-up
        return f"{r['single_call_ms']:.0f} once"
    if reason.startswith("OOM"):
        return "OOM"
    if r["status"] == "skipped" and reason.startswith("predicted"):
        return f"skip ~{r['predicted_mem_gib']:.0f}GiB" if "GiB" in reason else f"skip ~{r['predicted_s']:.0f}s"
    return r["status"]


def summary_text(summary: dict) -> str:
    steps, env = summary["steps"], summary["steps"].get("env", {})
    lines = [f"gpu_check {'(DRY RUN, CPU) ' if summary['dry_run'] else ''}{summary['finished']}  "
             f"total {summary['total_seconds']:.0f} s",
             f"device: {env.get('device', '?')} {env.get('capability', '')}  torch {env.get('torch', '?')} "
             f"(CUDA {env.get('torch_cuda')})  triton {env.get('triton', '?')}  nvcc {env.get('nvcc', '?')}  "
             f"python {env.get('python', '?')}",
             "",
             f"{'step':<12}{'status':<9}{'s/budget':>10}  note"]
    for name in STEP_ORDER:
        s = steps.get(name, {"status": "missing", "reason": "never recorded"})
        t = f"{_f(s.get('seconds'), '.0f')}/{_f(s.get('budget_s'), '.0f')}"
        lines.append(f"{name:<12}{s.get('status', '?'):<9}{t:>10}  {str(s.get('reason', ''))[:150]}")

    corr = steps.get("correctness", {})
    if corr.get("rows"):
        lines += ["", "correctness: worst err/limit per backend and dtype (pass < 1; err = ||out-ref||/||ref|| "
                      "vs float64 reference)",
                  f"{'backend':<8}{'dtype':<10}{'pass':>7}  " + "".join(f"{q:>10}" for q in QUANTITIES)
                  + "  worst case"]
        groups: dict[tuple, list] = {}
        for r in corr["rows"]:
            groups.setdefault((r["backend"], r["dtype"]), []).append(r)
        order = ["cuda", "cpp", "triton"]
        dts = list(THRESHOLDS)
        for (be, dt), rows in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]) if kv[0][0] in order
                                                                     else 99, dts.index(kv[0][1]))):
            checked = [r for r in rows if "checks" in r]
            n_ok = sum(r["status"] == "ok" for r in rows)
            cells, worst = [], (0.0, "")
            for q in QUANTITIES:
                ratios = [(r["checks"][q]["err"] / r["checks"][q]["limit"] if isinstance(r["checks"][q]["err"], float)
                           else math.inf, r["case"]) for r in checked if q in r["checks"]]
                v = max(ratios, default=(None, ""))
                cells.append(f"{_f(v[0], '.2g'):>10}")
                if v[0] is not None and v[0] > worst[0]:
                    worst = (v[0], f"{q} {v[1]}")
            lines.append(f"{be:<8}{dt:<10}{f'{n_ok}/{len(rows)}':>7}  " + "".join(cells) + f"  {worst[1]}")
        for r in corr["rows"]:
            if r["status"] == "failed" and "reason" in r:
                lines.append(f"  ERROR {r['backend']} {r['case']} {r['dtype']}: {r['reason'][:120]}")
        for sp in corr.get("special", []):
            if sp.get("status") == "skipped":
                lines.append(f"{sp['check']}: skipped ({sp.get('reason', '')})")
                continue
            detail = []
            for be, v in sp.get("backends", {}).items():
                detail.append(f"{be} " + (v["error"][:80] if "error" in v else
                                          " ".join(f"{q} {_f(c['err'], '.1e')}" for q, c in v.items())))
            size = f"B={sp.get('B')} M={sp.get('M')} D={sp.get('D')} {sp.get('dtype')}" if "B" in sp else ""
            extra = f", {sp.get('instances_checked')} instances checked" if "instances_checked" in sp else ""
            lines.append(f"{sp['check']} ({size}{extra}): {sp.get('status')}; " + "; ".join(detail) +
                         (f" {sp.get('reason', '')}" if "reason" in sp else ""))

    bench = steps.get("bench", {})
    if bench.get("rows"):
        rows = bench["rows"]
        lines += ["", f"bench on {bench.get('device')}: B={bench.get('B')} D={bench.get('D')}, median ms fwd / "
                      f"fwd+bwd (% of copy bandwidth {_f(bench.get('copy_gbps'), '.0f')} GB/s at the byte floor)"]

        def cell(**kw):  # the row that matches kw, as a cell of a w-wide column
            row = next((r for r in rows if all(r.get(k) == v for k, v in kw.items())), None)
            return bench_cell_text(row)[:w - 1]

        kernels = list(bench.get("backends") or KERNEL_BACKENDS_GPU)
        sizes = sorted({(r["M"], r["dtype"]) for r in rows}, key=lambda k: (k[0], k[1] != "float32"))
        w = 13
        gram_providers = [p for k in kernels for p in (k, k + DIAGONAL)] + list(CUDA_VARIANTS) * (
            "cuda" in kernels) + list(TRITON_VARIANTS) * ("triton" in kernels) + ["torch"]
        for mode in ("fwd", "fwd+bwd"):  # one table a mode: providers as columns
            lines.append(f"{'gram ' + ('f+b' if mode == 'fwd+bwd' else mode):<9}{'M':>3} {'dtype':<9}" +
                         "".join(f"{p.replace('triton-', 't-'):<{w}}" for p in gram_providers))
            for m, dt in sizes:
                lines.append(f"{'':<9}{m:>3} {dt:<9}" + "".join(
                    f"{cell(target='gram_svd', provider=p, M=m, dtype=dt, mode=mode):<{w}}" for p in gram_providers))
        # reg1 (with the contrastive term): both its backends in each matmul precision, the recipe
        loss = [(0.0, p, None) for p in kernels + ["recipe"]] + \
            [(1.0, p, prec) for p in CONTRASTIVE_BACKENDS for prec in CONTRASTIVE_PRECISIONS] + [(1.0, "recipe", None)]

        def label(reg, p, prec):  # reg1:ieee (Triton), reg1:b-ieee (blocked)
            name = {"triton": prec, "blocked": f"b-{prec}"}.get(p) if prec else None
            return f"reg{reg:.0f}:" + (name or p.replace("triton-", "t-"))

        lines.append(f"{'loss f+b':<9}{'M':>3} {'dtype':<9}" + "".join(f"{label(*c):<{w}}" for c in loss))
        for m, dt in sizes:
            lines.append(f"{'':<9}{m:>3} {dt:<9}" + "".join(
                f"{cell(target='loss', provider=p, M=m, dtype=dt, reg_weight=reg, precision=prec):<{w}}"
                for reg, p, prec in loss))
    ncu = steps.get("ncu", {})
    if ncu.get("rows"):
        lines += ["", f"ncu on {ncu.get('device')} (B={ncu.get('B')} M={ncu.get('M')} D={ncu.get('D')} "
                      f"{ncu.get('dtype')}): DRAM bytes vs the floor (fwd: read Z; bwd: read Z + write dZ)",
                  f"{'backend':<8}{'pass':<5}{'read MB':>10}{'write MB':>10}{'us':>9}{'GB/s':>8}{'x floor':>9}"
                  f"{'SM%':>6}{'occ%':>6}{'Minst':>8}{'regs':>6}  kernel"]
        for r in ncu["rows"]:
            inst = r.get("warp_instructions")
            lines.append(f"{r['backend']:<8}{r['pass_']:<5}{_f((r['dram_read_bytes'] or 0) / 1e6, '.1f'):>10}"
                         f"{_f((r['dram_write_bytes'] or 0) / 1e6, '.1f'):>10}{_f((r['time_s'] or 0) * 1e6, '.0f'):>9}"
                         f"{_f(r.get('dram_gbps'), '.0f'):>8}{_f(r.get('bytes_over_floor'), '.2f'):>9}"
                         f"{_f(r.get('sm_pct'), '.0f'):>6}{_f(r.get('occupancy_pct'), '.0f'):>6}"
                         f"{_f(None if inst is None else inst / 1e6, '.1f'):>8}{_f(r.get('registers'), '.0f'):>6}  "
                         f"{r['kernel'][:40]}")
    lines += ["", f"files in {summary['out']}: {', '.join(summary['files'])}"]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def cmd_summarize(args):
    steps_dir, out = args.steps, args.out
    steps = {}
    for name in STEP_ORDER:
        d = read_json(steps_dir / f"{name}.json")
        if d is not None:
            steps[name] = d
    t0 = float(os.environ.get("GPU_CHECK_T0", "0") or 0)
    summary = {"script": "benchmarks/gpu_check.sh", "dry_run": args.dry_run,
               "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "total_seconds": (now() - t0) if t0 else 0.0,
               "out": str(out), "device": steps.get("env", {}).get("device"),
               "status": {n: steps.get(n, {}).get("status", "missing") for n in STEP_ORDER},
               "steps": steps}
    bench = {"device": steps.get("bench", {}).get("device"), "copy_gbps": steps.get("bench", {}).get("copy_gbps"),
             "direct": steps.get("bench", {}).get("rows", []), "cli": steps.get("bench_cli", {}).get("rows", [])}
    write_json(out / "bench.json", _clean(bench))
    summary["files"] = [f for f in OUT_FILES if (out / f).exists() or f in ("summary.json", "summary.txt")]
    write_json(out / "summary.json", _clean(summary))
    text = summary_text(summary)
    (out / "summary.txt").write_text(text)
    if args.print:
        sys.stdout.write(text)


# ----------------------------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("env", "static", "bandwidth", "sanitize", "correctness", "large", "bench", "bench-cli",
                                       "ncu-driver", "finish", "summarize"))
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "out/gpu_check"))
    p.add_argument("--steps", type=Path, default=None, help="per-step JSON folder (default $GPU_CHECK_STEPS or "
                                                            "OUT/.steps)")
    p.add_argument("--dry-run", action="store_true", default=os.environ.get("GPU_CHECK_DRY_RUN") == "1")
    p.add_argument("--budget", type=float, help="seconds this step may take (it stops starting work before)")
    p.add_argument("--step", help="finish: the step to close")
    p.add_argument("--skip", help="finish: record the step as skipped with this reason")
    p.add_argument("--budget-s", type=float, help="finish: the step's whole budget (default: its runs' sum)")
    p.add_argument("--backend", help="large: the backend to check")
    p.add_argument("--tag", default="plain", help="sanitize: plain, memcheck, racecheck or synccheck")
    p.add_argument("--sample", type=int, default=14, help="sanitize: combos per backend")
    p.add_argument("--triton-sample", type=int, help="sanitize: combos for triton (default --sample)")
    p.add_argument("--print", action="store_true", help="summarize: print summary.txt")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.steps = args.steps or Path(os.environ.get("GPU_CHECK_STEPS") or args.out / ".steps")
    args.steps.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        # CPU only: Triton runs in its interpreter, which must be chosen before triton is imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    handler = {"env": cmd_env, "static": cmd_static, "bandwidth": cmd_bandwidth, "sanitize": cmd_sanitize,
               "correctness": cmd_correctness, "large": cmd_large, "bench": cmd_bench, "bench-cli": cmd_bench_cli,
               "ncu-driver": cmd_ncu_driver, "finish": cmd_finish, "summarize": cmd_summarize}[args.command]
    handler(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
