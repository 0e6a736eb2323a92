"""Static GPU checks, no GPU needed: what the compilers say about the kernels for sm_90.

- CUDA: every csrc/cuda/*.cu file compiled with a bare `nvcc -arch=sm_90 -Xptxas -v` (the sources include no
  torch header), in parallel; per kernel instantiation the registers, stack frame and spill bytes.
- Triton: every kernel compiled for sm_90 with the specialisation a real launch gets. The package's own launchers
  run on CPU tensors with `wrap_triton` replaced by a recorder, so the grid, arguments and constexprs are exactly
  those of a launch; Triton's binder then specialises them as it would on a GPU (16-byte aligned pointers,
  integers equal to 1 or divisible by 16). Per kernel: registers and spills (ptxas -v on the PTX) and whether the
  code uses MMA instructions (wgmma / mma in the PTX). The Gram kernels compile on both paths (RESIDENT: the
  instance loaded once into registers; chunked: a pass over D per reduction).

The contract (checked by `check`, and by tests/test_static_gpu.py): no spill and no stack frame (no array in local
memory) in every fp32/bf16/fp16 CUDA kernel, M = 2 to 16; no spill in any Triton kernel for M <= 8; and MMA in
the contrastive kernels under TF32 and bf16.

    python benchmarks/static_check.py [--cuda] [--triton] [--json PATH] [--jobs N] [--no-cache]
    python benchmarks/static_check.py --scan   # wider, informational: spills of every Triton Gram kernel with
                                               # M <= 8, and the Jacobi sweep's cost in each ordering, from the PTX
    python benchmarks/static_check.py --warp-sweeps   # the CUDA warp kernels' sweep (M = 9 to 16) from the PTX,
                                                      # with the solve's predicted issue time

Each part's result is cached under cache_dir() by a hash of its inputs and compilers (part_key): an unchanged tree
compiles nothing; --no-cache compiles anyway. Exits 1 when a check fails. The Triton part needs TRITON_INTERPRET
unset.
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_CLEAN_M = 8  # up to this M the Triton kernels must keep everything in registers (the CUDA kernels: every M)
BUILD_CORES = 16  # the GPU machines' cores: the build-time prediction's worker count

# ------------------------------------------------------------------------------------------------------- CUDA

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_\w+'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _cuda_kernel(mangled: str) -> dict:
    """direction, dtype and M of a mangled pmrl kernel name (forward_kernelI<In><T>Li<M>E...)."""
    direction = "forward" if "forward_kernel" in mangled else "backward"
    dtype = ("bfloat16" if "bfloat16" in mangled else "float16" if "half" in mangled
             else "float64" if re.search(r"kernelIddLi", mangled) else "float32")
    m = re.search(r"Li(\d+)E", mangled)
    return {"direction": direction, "dtype": dtype, "M": int(m.group(1)) if m else None}


def parse_ptxas(text: str) -> list[dict]:
    """One record per entry function of a `ptxas -v` report."""
    records = []
    parts = _ENTRY.split(text)
    for name, body in zip(parts[1::2], parts[2::2]):
        frame = _FRAME.search(body)
        regs = _REGS.search(body)
        stack, stores, loads = map(int, frame.groups()) if frame else (0, 0, 0)
        records.append(dict(_cuda_kernel(name), kernel=name, registers=int(regs.group(1)) if regs else None,
                            stack_bytes=stack, spill_stores=stores, spill_loads=loads))
    return records


# a bare nvcc, as CI compiles the sources (no torch header under csrc/cuda); the PTX counts use the same flags
NVCC_FLAGS = ["-std=c++17", "-arch=sm_90", "-O3", f"-I{ROOT / 'csrc' / 'include'}"]


def _compile_cu(source: Path, out_dir: Path) -> dict:
    nvcc = shutil.which("nvcc")
    cmd = [nvcc, "-c", *NVCC_FLAGS, "-Xptxas", "-v", str(source), "-o", str(out_dir / (source.stem + ".o"))]
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True)
    return {"file": source.name, "returncode": result.returncode, "kernels": parse_ptxas(result.stderr),
            "seconds": time.perf_counter() - start, "errors": result.stderr[-3000:] if result.returncode else ""}


def build_seconds(seconds: list[float], jobs: int) -> float:
    """The wall time of compiling files of these durations on `jobs` parallel workers, longest first (what ninja
    does with MAX_JOBS): the prediction of the extension's CUDA build time on a machine with that many cores."""
    workers = [0.0] * jobs
    for t in sorted(seconds, reverse=True):
        workers[workers.index(min(workers))] += t
    return max(workers)


def cuda_report(jobs: int) -> dict:
    if shutil.which("nvcc") is None:
        return {"status": "skipped", "reason": "nvcc not found"}
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        files = list(pool.map(lambda s: _compile_cu(s, Path(tmp)), sources))
    return {"status": "ok", "files": files}


# ----------------------------------------------------------------------------------------------------- Triton

# Representative launches: (what, kwargs). M covers the padded widths 2, 4, 8, 16 and odd sizes in between.
GRAM_LAUNCHES = [dict(m=m, d=512, dtype=dtype, normalize=normalize)
                 for m in (2, 3, 4, 5, 8, 9, 16) for dtype in ("float32", "bfloat16")
                 for normalize in (True, False) if normalize or dtype == "float32"]
GRAM_LAUNCHES += [dict(m=4, d=512, dtype="float16", normalize=True), dict(m=7, d=129, dtype="float32", normalize=True)]
# both paths at M <= 8 (at D = 512 M <= 4 is resident, larger M chunked): M = 8 resident, M = 4 chunked
GRAM_LAUNCHES += [dict(m=m, d=d, dtype=dtype, normalize=True) for m, d in ((8, 256), (4, 4096))
                  for dtype in ("float32", "bfloat16")]
CONTRASTIVE_LAUNCHES = [dict(b=4096, d=d, precision=p, same=same)
                        for p in ("ieee", "tf32", "bf16") for d, same in ((512, True), (128, False))]


class _Recorder:
    """Stands in for torch.library.wrap_triton: records the launch instead of running it."""

    def __init__(self):
        self.launches = []

    def __call__(self, kernel):
        recorder = self

        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    recorder.launches.append((kernel, grid, args, kwargs))
                return launch
        return _Grid()


def _record(module, call) -> list:
    recorder = _Recorder()
    original = module.wrap_triton
    module.wrap_triton = recorder
    try:
        call()
    finally:
        module.wrap_triton = original
    return recorder.launches


def _gram_launches(spec: dict, batch: int = 4096) -> list:
    import torch

    from pmrl_kernels.ops import triton_gram

    dtype = getattr(torch, spec["dtype"])
    b, m, d = batch, spec["m"], spec["d"]
    z = torch.randn(b, m, d, dtype=dtype)
    zs = list(z.unbind(1))
    s, u = torch.rand(b, m), torch.rand(b, m, m)
    fwd = _record(triton_gram, lambda: triton_gram.gram_eig_fwd._init_fn(zs, spec["normalize"]))
    bwd = _record(triton_gram, lambda: triton_gram.gram_eig_bwd._init_fn(
        zs, s, u, torch.rand(b, m), torch.rand(b, d), spec["normalize"]))
    return fwd + bwd


def _contrastive_launches(spec: dict) -> list:
    import torch

    from pmrl_kernels.ops import triton_contrastive as tc

    lead = torch.randn(spec["b"], spec["d"])
    lse, g = torch.randn(spec["b"]), torch.randn(spec["b"])
    fwd = _record(tc, lambda: tc.contrastive_fwd._init_fn(lead, lead, 0.1, 0, spec["precision"]))
    if spec["same"]:
        bwd = _record(tc, lambda: tc.contrastive_sym_bwd._init_fn(lead, lse, lse, g, 0.1, spec["precision"]))
    else:
        cols = torch.randn(2 * spec["b"], spec["d"])
        bwd = _record(tc, lambda: tc.contrastive_bwd._init_fn(lead, cols, lse, lse, g, 0.1, 0, spec["precision"]))
    return fwd + bwd


def _compile_launch(kernel, args, kwargs, keep_ptx: bool = False) -> dict:
    """Compile one recorded launch for sm_90 as a GPU launch would specialise it; registers, spills, MMA (and the
    PTX itself with keep_ptx)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                              options=options.__dict__)
    ptx = compiled.asm["ptx"]
    arch = re.search(r"\.target\s+(sm_\w+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
        result = subprocess.run([ptxas, "-lineinfo", "-v", f"--gpu-name={arch}", str(path), "-o", str(Path(tmp) / "k.cubin")],
                                capture_output=True, text=True)
    frame = _FRAME.search(result.stderr)
    regs = _REGS.search(result.stderr)
    stack, stores, loads = map(int, frame.groups()) if frame else (None, None, None)
    return {"registers": int(regs.group(1)) if regs else None, "stack_bytes": stack, "spill_stores": stores,
            "spill_loads": loads, "mma": bool(re.search(r"\b(wgmma\.mma_async|mma\.sync)", ptx)),
            "wgmma": bool(re.search(r"\bwgmma\.mma_async", ptx)), "shared_bytes": compiled.metadata.shared,
            "num_warps": options.num_warps, **({"ptx": ptx} if keep_ptx else {})}


def triton_report() -> dict:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return {"status": "skipped", "reason": "TRITON_INTERPRET=1 replaces the compiler in this process"}
    kernels = []
    for family, specs, record in (("gram", GRAM_LAUNCHES, _gram_launches),
                                  ("contrastive", CONTRASTIVE_LAUNCHES, _contrastive_launches)):
        for spec in specs:
            for kernel, grid, args, kwargs in record(spec):
                row = dict(spec, family=family, kernel=kernel.fn.__name__,
                           mode=kwargs.get("MODE"), resident=kwargs.get("RESIDENT"), grid=list(grid))
                try:
                    row.update(_compile_launch(kernel, args, kwargs))
                except Exception as exc:  # a kernel that does not compile is a finding, not a crash
                    row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                kernels.append(row)
    return {"status": "ok", "kernels": kernels}


# ------------------------------------------------------------------------------------------------------ scan

# Every Gram configuration with M <= 8 at a D that is a multiple of 16 and one that is not (Triton specialises
# integers divisible by 16), fp32 and bf16, both normalisations, forward and backward: wider than the contract's
# sample.
SCAN_LAUNCHES = [dict(m=m, d=d, dtype=dtype, normalize=normalize) for m in range(2, MAX_CLEAN_M + 1)
                 for d in (129, 512) for dtype in ("float32", "bfloat16") for normalize in (True, False)]
SWEEP_COST_M = (2, 3, 4, 8, 16)
_LABEL = re.compile(r"^(\$L__BB\d+_\d+):")
_BACK_EDGE = re.compile(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);")


def ptx_loops(ptx: str) -> list[dict]:
    """The loops of a PTX listing: each back-edge (a branch to an earlier label) with the body between them, its
    instruction count (lines that are not labels, directives, braces or comments), bar.sync count and whether it
    takes a square root (sqrt.rn: the Jacobi rotation's)."""
    lines = [line.strip() for line in ptx.splitlines()]
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line))}
    loops = []
    for end, line in enumerate(lines):
        m = _BACK_EDGE.search(line)
        if m and labels.get(m.group(1), end) < end:
            body = lines[labels[m.group(1)]:end + 1]
            loops.append({"start": labels[m.group(1)], "end": end,
                          "instructions": sum(1 for x in body if x and not x.startswith(("$", ".", "//", "{", "}"))),
                          "barriers": sum("bar.sync" in x for x in body),
                          "shuffles": sum("shfl.sync" in x for x in body),
                          "sqrt": any("sqrt.rn" in x for x in body)})
    return loops


def rotation_loop(loops: list[dict]) -> dict:
    """The innermost loop that takes a square root: one Jacobi rotation (cyclic) or one round (parallel)."""
    with_sqrt = [lp for lp in loops if lp["sqrt"]]
    return min(with_sqrt, key=lambda lp: lp["end"] - lp["start"])


def scan_report() -> dict:
    """Spills of the forward and backward kernels of every SCAN_LAUNCHES configuration, and the sweep's cost in each
    Jacobi ordering at SWEEP_COST_M (fp32, D = 512): the rotation loop's body times its trips a sweep (M (M - 1) / 2
    rotations, MP - 1 rounds)."""
    from pmrl_kernels.ops import triton_gram

    spills = []
    for spec in SCAN_LAUNCHES:
        for direction, (kernel, _, args, kwargs) in zip(("forward", "backward"), _gram_launches(spec)):
            spills.append(dict(spec, direction=direction, **_compile_launch(kernel, args, kwargs)))
    sweeps = []
    saved = triton_gram.CYCLIC_JACOBI_MAX_M
    try:
        for m in SWEEP_COST_M:
            for ordering, threshold in (("cyclic", 16), ("parallel", 0)):
                triton_gram.CYCLIC_JACOBI_MAX_M = threshold
                kernel, _, args, kwargs = _gram_launches(dict(m=m, d=512, dtype="float32", normalize=True))[0]
                body = rotation_loop(ptx_loops(_compile_launch(kernel, args, kwargs, keep_ptx=True)["ptx"]))
                trips = m * (m - 1) // 2 if ordering == "cyclic" else (1 << (m - 1).bit_length()) - 1
                sweeps.append(dict(m=m, ordering=ordering, body_instructions=body["instructions"],
                                   body_barriers=body["barriers"], trips=trips,
                                   sweep_instructions=body["instructions"] * trips,
                                   sweep_barriers=body["barriers"] * trips))
    finally:
        triton_gram.CYCLIC_JACOBI_MAX_M = saved
    return {"spills": spills, "sweeps": sweeps}


WARP_SWEEP_M = tuple(range(9, 17))  # the CUDA kernels' warp-spread range (csrc/cuda/kernels.cuh, kWarpMathsMinM)


def cuda_warp_sweeps() -> list[dict]:
    """One Jacobi sweep of the CUDA warp kernels (fp32 forward, the round-robin ordering, all rounds unrolled into
    the sweep loop), from the PTX of each M in WARP_SWEEP_M: instructions and shuffles a warp issues a sweep."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in sorted((ROOT / "csrc" / "cuda").glob("gram_eig_forward_m*.cu")):
            lo, hi = (int(x) for x in source.stem.rsplit("_m", 1)[1].split("_"))
            if hi < WARP_SWEEP_M[0]:
                continue
            out = Path(tmp) / (source.stem + ".ptx")
            subprocess.run([nvcc, "-ptx", *NVCC_FLAGS, str(source), "-o", str(out)], check=True, capture_output=True)
            entries = re.split(r"\n\.visible \.entry ", out.read_text())[1:]
            for m in range(max(lo, WARP_SWEEP_M[0]), hi + 1):
                entry = next(e for e in entries if e.startswith(f"_ZN4pmrl4cuda14forward_detail19warp_forward_kernelIffLi{m}E"))
                body = rotation_loop(ptx_loops(entry))
                rows.append(dict(m=m, rounds=m - 1 + m % 2, sweep_instructions=body["instructions"],
                                 sweep_shuffles=body["shuffles"]))
    return rows


def jacobi_sweeps(m: int, batch: int = 512, d: int = 512, seed: int = 0) -> "torch.Tensor":
    """Sweeps the round-robin Jacobi solve takes (the last one rotating nothing), per instance, in float32 on the Gram
    matrices of `batch` instances of M normalised Gaussian rows of D features (the bench's input), with the
    kernels' rotation test and sweep cap: a simulation of pmrl/warp_instance.h in torch, whole matrices at a time."""
    import torch

    from pmrl_kernels.constants import JACOBI_MAX_SWEEPS

    gen = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(batch, m, d, generator=gen), dim=2)
    a = z @ z.transpose(1, 2)
    n = m + m % 2
    eps = torch.finfo(torch.float32).eps
    count = torch.zeros(batch, dtype=torch.int64)
    active = torch.ones(batch, dtype=torch.bool)
    for _ in range(JACOBI_MAX_SWEEPS):
        rotated = torch.zeros(batch, dtype=torch.bool)
        for t in range(n - 1):
            index = [0] + [1 + (pos - 1 + t) % (n - 1) for pos in range(1, n)]
            for k in range(n // 2):
                p, q = sorted((index[k], index[n - 1 - k]))
                if q >= m:
                    continue
                app, aqq, apq = a[:, p, p], a[:, q, q], a[:, p, q]
                rot = (apq * apq > eps * app.abs() * (eps * aqq.abs())) & active
                theta = torch.where(rot, (aqq - app) / torch.where(rot, 2 * apq, torch.ones_like(apq)), 0.0)
                tn = torch.sign(theta) / (theta.abs() + torch.sqrt(1 + theta * theta))
                tn = torch.where(theta == 0, 1.0, tn)
                c = torch.where(rot, 1 / torch.sqrt(1 + tn * tn), 1.0)[:, None]
                s_ = torch.where(rot, tn, 0.0)[:, None] * c
                cols = a[:, :, [p, q]].clone()
                a[:, :, p], a[:, :, q] = c * cols[..., 0] - s_ * cols[..., 1], s_ * cols[..., 0] + c * cols[..., 1]
                rows = a[:, [p, q], :].clone()
                a[:, p, :], a[:, q, :] = c * rows[:, 0] - s_ * rows[:, 1], s_ * rows[:, 0] + c * rows[:, 1]
                a[rot, p, q] = 0.0
                a[rot, q, p] = 0.0
                rotated |= rot
        count += active.long()
        active &= rotated
        if not active.any():
            break
    return count


def scan_text(scan: dict) -> str:
    spilled = [r for r in scan["spills"] if r["spill_stores"] or r["spill_loads"]]
    lines = [f"Gram kernels, sm_90: {len(spilled)} of {len(scan['spills'])} with M <= {MAX_CLEAN_M} spill (direction, "
             "M, D, dtype, normalize: registers, spill stores/loads bytes)"]
    lines += [f"  {r['direction']} M={r['m']} D={r['d']} {r['dtype']} normalize={r['normalize']}: "
              f"{r['registers']} registers, {r['spill_stores']}/{r['spill_loads']} B" for r in spilled]
    lines += ["", "Jacobi sweep, fp32 D = 512 (PTX: the rotation loop's body x its trips a sweep)",
              f"{'M':>3} {'ordering':<9}{'body':>6}{'bar':>5}{'trips':>6}{'sweep':>8}{'bar':>6}"]
    lines += [f"{r['m']:>3} {r['ordering']:<9}{r['body_instructions']:>6}{r['body_barriers']:>5}{r['trips']:>6}"
              f"{r['sweep_instructions']:>8}{r['sweep_barriers']:>6}" for r in scan["sweeps"]]
    return "\n".join(lines)


def warp_sweep_text() -> str:
    """cuda_warp_sweeps with the sweeps a solve takes (jacobi_sweeps), and the solve's issue time at B = 65536 on an
    H100 SXM or H200 (132 SMs, 4 warp schedulers each, 1.98 GHz: one warp instruction a scheduler and cycle), a
    prediction."""
    issue_rate = 132 * 4 * 1.98e9
    lines = ["CUDA warp Jacobi sweep, fp32 forward (PTX: the sweep loop, its rounds unrolled); sweeps a solve takes",
             "(jacobi_sweeps: float32, 512 instances of normalised Gaussian rows, D = 512, the last sweep rotating",
             "nothing); the solve's predicted issue time at B = 65536 on 132 SMs x 4 schedulers x 1.98 GHz",
             f"{'M':>3}{'rounds':>7}{'instr':>7}{'shfl':>6}{'sweeps':>8}{'max':>5}{'solve ms':>10}"]
    for r in sorted(cuda_warp_sweeps(), key=lambda r: r["m"]):
        counts = jacobi_sweeps(r["m"]).double()
        ms = 65536 * float(counts.mean()) * r["sweep_instructions"] / issue_rate * 1e3
        lines.append(f"{r['m']:>3}{r['rounds']:>7}{r['sweep_instructions']:>7}{r['sweep_shuffles']:>6}"
                     f"{float(counts.mean()):>8.2f}{int(counts.max()):>5}{ms:>10.2f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- byte model

# the vendors' HBM peak bandwidths, which the predictions in docs/results.md divide the modelled bytes by
PEAK_BANDWIDTH = {"H100 SXM": 3.35e12, "H200": 4.8e12}
BYTE_MODEL_SHAPE = dict(batch=65536, modalities=4, features=512)


def byte_model_rows() -> list[dict]:
    """triton_gram.dram_bytes at BYTE_MODEL_SHAPE (dL/dS and dL/dlead given, normalised), fp32 and bf16, forward and
    backward: the path the launch takes, its bytes, the chunked path's for comparison, and the predicted times at
    HBM peak (a prediction from the model, not a measurement: it ignores the Jacobi solve and launch latency)."""
    import triton

    from pmrl_kernels.ops import triton_gram

    batch, modalities, features = BYTE_MODEL_SHAPE.values()
    rows = []
    for dtype, itemsize in (("fp32", 4), ("bf16", 2)):
        for direction in ("forward", "backward"):
            resident = triton_gram.launch_config(triton.next_power_of_2(modalities), features)["RESIDENT"]
            args = (direction, batch, modalities, features, itemsize)
            moved = sum(triton_gram.dram_bytes(*args))
            rows.append(dict(dtype=dtype, direction=direction, resident=resident, bytes=moved,
                             chunked_bytes=sum(triton_gram.dram_bytes(*args, resident=False)),
                             ms={gpu: moved / rate * 1e3 for gpu, rate in PEAK_BANDWIDTH.items()}))
    return rows


def byte_model_table() -> str:
    """byte_model_rows as docs/results.md's markdown table."""
    gpus = list(PEAK_BANDWIDTH)
    rows = byte_model_rows()
    path = " (one pass)" if all(r["resident"] for r in rows) else ""
    lines = [f"| dtype | kernel | bytes{path} | " + " | ".join(f"{g} ({PEAK_BANDWIDTH[g] / 1e12:g} TB/s)" for g in gpus)
             + " | bytes (chunked) |", "|---" * (4 + len(gpus)) + "|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['direction']} | {r['bytes'] / 1e9:.3f} GB | "
                     + " | ".join(f"{r['ms'][g]:.3f} ms" for g in gpus) + f" | {r['chunked_bytes'] / 1e9:.3f} GB |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------ cache

# What the CUDA part's compiles read besides this script (its flags): the kernels' sources and headers.
CUDA_INPUTS = ("csrc/cuda/*", "csrc/include/**/*")
# The modules whose launchers the Triton part records: they and what they import decide every compile.
TRITON_LAUNCHERS = ("pmrl_kernels/ops/triton_gram.py", "pmrl_kernels/ops/triton_contrastive.py")


def imported_modules(root: Path, modules: tuple[str, ...]) -> set[Path]:
    """`modules` (paths under root) and the package modules they import, transitively. Package __init__ files are
    left out: they gather the API and shape no launch."""
    todo, seen = [root / m for m in modules], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = path.parents[node.level - 1]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "pmrl_kernels":
                base = root
            else:
                continue
            target = base.joinpath(*node.module.split(".")) if node.module else base
            found = [target.with_suffix(".py")] + [target / f"{alias.name}.py" for alias in node.names]
            todo += [f for f in found if f.is_file()]
    return seen


def cache_dir() -> Path:
    """PMRL_STATIC_CACHE, else pmrl_kernels/static_check under the user's cache folder (XDG_CACHE_HOME)."""
    if os.environ.get("PMRL_STATIC_CACHE"):
        return Path(os.environ["PMRL_STATIC_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pmrl_kernels" / "static_check"


def _toolchain(part: str) -> str:
    if part == "cuda":
        nvcc = shutil.which("nvcc")
        return subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout if nvcc else "no nvcc"
    import torch
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    return f"triton {triton.__version__} torch {torch.__version__} ptxas {get_ptxas(90).version}"


def part_key(part: str) -> str:
    """A hash of everything a part's result depends on: this script, the part's inputs (by path relative to ROOT and
    content) and its compilers' versions."""
    root = ROOT
    digest = hashlib.sha256(Path(__file__).read_bytes() + _toolchain(part).encode())
    files = sorted({f for pattern in CUDA_INPUTS for f in root.glob(pattern) if f.is_file()} if part == "cuda"
                   else imported_modules(root, TRITON_LAUNCHERS))
    for f in files:
        digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def cached(part: str, compute) -> dict:
    """The part's report from the cache when its key is there, else computed by `compute()` and stored when every
    compile in it succeeded (a failure is compiled again next time, in case it was the machine's). The report's
    "cache" entry says which."""
    key = part_key(part)
    path = cache_dir() / f"{part}-{key}.json"
    try:
        return dict(json.loads(path.read_text()), cache={"key": key, "path": str(path), "hit": True})
    except (OSError, ValueError):
        pass
    report = compute()
    compiled = report.get("status") == "ok" and not any(
        f["returncode"] for f in report.get("files", [])) and not any("error" in k for k in report.get("kernels", []))
    if compiled:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(json.dumps(report))
        os.replace(partial, path)  # whole or absent, for a concurrent reader
    return dict(report, cache={"key": key, "path": str(path) if compiled else None, "hit": False})


# ----------------------------------------------------------------------------------------------------- checks


def check(report: dict) -> list[str]:
    """The contract's violations (empty: all good)."""
    problems = []
    cuda = report.get("cuda", {})
    for f in cuda.get("files", []):
        if f["returncode"]:
            problems.append(f"{f['file']} does not compile: {f['errors'][-300:]}")
        for k in f["kernels"]:
            if k["dtype"] == "float64" or k["M"] is None:
                continue
            if k["spill_stores"] or k["spill_loads"] or k["stack_bytes"]:
                problems.append(f"CUDA {k['direction']} {k['dtype']} M={k['M']}: stack {k['stack_bytes']} B, "
                                f"spills {k['spill_stores']}/{k['spill_loads']} B")
    for k in report.get("triton", {}).get("kernels", []):
        what = f"Triton {k['kernel']} {json.dumps({x: k[x] for x in ('m', 'dtype', 'precision', 'd') if x in k})}"
        if "error" in k:
            problems.append(f"{what} does not compile: {k['error'][:300]}")
            continue
        if k.get("m", 0) <= MAX_CLEAN_M and (k["spill_stores"] or k["spill_loads"]):
            problems.append(f"{what}: spills {k['spill_stores']}/{k['spill_loads']} B")
        if k["family"] == "contrastive" and k.get("precision") in ("tf32", "bf16") and not k["mma"]:
            problems.append(f"{what}: no MMA instruction")
    return problems


def summary(report: dict) -> dict:
    """The numbers the static report carries: worst spills (CUDA: every M; Triton: M <= 8) and MMA use, per
    family."""
    cuda = [k for f in report.get("cuda", {}).get("files", []) for k in f["kernels"]
            if k["dtype"] != "float64" and k["M"] is not None]
    tri = [k for k in report.get("triton", {}).get("kernels", []) if "error" not in k]
    seconds = [f["seconds"] for f in report.get("cuda", {}).get("files", [])]
    return {
        "cuda_compile_seconds_per_file_max": max(seconds, default=None),
        # sm_90 only (TORCH_CUDA_ARCH_LIST's default), the .cpp binding aside; timed with --jobs processes here
        "cuda_build_seconds_on_16_cores_predicted": build_seconds(seconds, BUILD_CORES) if seconds else None,
        "cuda_kernels": len(cuda),
        "cuda_spill_bytes": sum(k["spill_stores"] + k["spill_loads"] for k in cuda),
        "cuda_max_stack_bytes": max((k["stack_bytes"] for k in cuda), default=None),
        "triton_kernels": len(tri),
        "triton_spill_bytes_m_le_8": sum((k["spill_stores"] or 0) + (k["spill_loads"] or 0)
                                         for k in tri if k.get("m", 0) <= MAX_CLEAN_M),
        "triton_contrastive_mma": {p: all(k["mma"] for k in tri if k.get("precision") == p)
                                   for p in ("ieee", "tf32", "bf16")},
        "problems": check(report),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", action="store_true", help="compile the CUDA sources (default: both parts)")
    parser.add_argument("--triton", action="store_true", help="compile the Triton kernels (default: both parts)")
    parser.add_argument("--json", help="write the full report here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel nvcc processes")
    parser.add_argument("--bytes", action="store_true", help="print the Gram kernels' byte model table and exit")
    parser.add_argument("--scan", action="store_true", help="print the wider spill scan and the sweep costs and exit")
    parser.add_argument("--warp-sweeps", action="store_true",
                        help="print the CUDA warp kernels' sweep costs and predicted solve times and exit")
    parser.add_argument("--no-cache", action="store_true",
                        help="compile even when the cache (cache_dir()) holds the result for these sources")
    args = parser.parse_args(argv)
    both = not (args.cuda or args.triton)
    sys.path.insert(0, str(ROOT))
    if args.bytes:
        print(byte_model_table())
        return 0
    if args.scan:
        print(scan_text(scan_report()))
        return 0
    if args.warp_sweeps:
        print(warp_sweep_text())
        return 0
    parts = {"cuda": lambda: cuda_report(args.jobs), "triton": triton_report}
    wanted = [part for part in parts if both or getattr(args, part)]

    def run(part):
        return parts[part]() if args.no_cache else cached(part, parts[part])

    with concurrent.futures.ThreadPoolExecutor(len(wanted)) as pool:
        # the parts overlap: nvcc runs in subprocesses while the Triton compiles keep one core busy
        report = dict(zip(wanted, pool.map(run, wanted)))
    report["summary"] = summary(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1))
    return 1 if report["summary"]["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
