"""What the compilers say about every kernel for sm_90, without a GPU (benchmarks/static_check.py; the report comes
from conftest.static_report, shared by these tests and cached by source hash): every .cu file compiles with a bare
nvcc, every Triton kernel compiles with the specialisation a real launch gets (the Gram kernels on both paths),
nothing spills for M <= 8, the CUDA stack frames stay under 512 bytes, and the contrastive kernels use MMA
instructions under TF32 and bf16; the predicted bytes and times in docs/results.md are the Gram kernels' byte model.

The tests that compile carry the `sm90` marker, which the default test command deselects (pyproject.toml's addopts):
`python -m pytest tests -m sm90` runs them (CI's own step)."""
import importlib.util
import shutil
from pathlib import Path

import pytest

from pmrl_kernels.ops import triton_contrastive, triton_gram

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("static_check", ROOT / "benchmarks" / "static_check.py")
static_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(static_check)


sm90 = pytest.mark.sm90
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")


@sm90
@needs_nvcc
def test_every_cuda_source_compiles_without_spills(static_report):
    files = static_report["cuda"]["files"]
    assert sorted(f["file"] for f in files) == sorted(p.name for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    for f in files:
        assert f["returncode"] == 0, f"{f['file']}:\n{f['errors']}"
    kernels = [k for f in files for k in f["kernels"]]
    # every (direction, dtype, M) is instantiated exactly once over the files
    keys = sorted((k["direction"], k["dtype"], k["M"]) for k in kernels)
    expected = sorted((d, t, m) for d in ("forward", "backward") for t in ("float32", "float64", "bfloat16", "float16")
                      for m in range(2, 17))
    assert keys == expected
    # every M: the M x M arrays a lane up to M = 8, the warp-spread rows from 9 on (no array in local memory)
    clean = [k for k in kernels if k["dtype"] != "float64"]
    bad = [k for k in clean if k["spill_stores"] or k["spill_loads"] or k["stack_bytes"]]
    assert not bad, bad


@sm90
def test_every_triton_kernel_compiles_as_launched_without_spills(static_report):
    kernels = static_report["triton"]["kernels"]
    compiled = {k["kernel"] for k in kernels if "error" not in k}
    defined = {name for module in (triton_gram, triton_contrastive) for name in vars(module)
               if name.endswith("_kernel")}
    assert compiled == defined, f"kernels without an sm_90 compile: {defined - compiled}"
    errors = [k for k in kernels if "error" in k]
    assert not errors, errors[0]
    spills = [k for k in kernels if k.get("m", 0) <= static_check.MAX_CLEAN_M and (k["spill_stores"] or k["spill_loads"])]
    assert not spills, spills


@sm90
def test_gram_kernels_compile_on_both_paths(static_report):
    """Forward and backward, resident (the instance loaded once) and chunked, each at some M <= 8: the no-spill
    contract covers both paths."""
    gram = [k for k in static_report["triton"]["kernels"]
            if k["family"] == "gram" and k["m"] <= static_check.MAX_CLEAN_M]
    assert {(k["kernel"], k["resident"]) for k in gram} == {
        (kernel, resident) for kernel in ("_gram_eig_fwd_kernel", "_gram_eig_bwd_kernel") for resident in (True, False)}


def test_documented_predictions_are_the_byte_model():
    """docs/results.md's byte model shows static_check.byte_model_table() as it is (`static_check.py --bytes`)."""
    assert static_check.byte_model_table() in (ROOT / "docs" / "results.md").read_text()


@sm90
def test_contrastive_uses_tensor_cores_where_torch_would(static_report):
    kernels = [k for k in static_report["triton"]["kernels"] if k["family"] == "contrastive"]
    modes = {(k["precision"], k["kernel"], k["mode"]) for k in kernels}
    # forward, and every backward mode (rows, columns, symmetric), at every precision
    for precision in ("ieee", "tf32", "bf16"):
        assert {(precision, "_contrastive_fwd_kernel", None)} | {
            (precision, "_contrastive_bwd_kernel", mode) for mode in (0, 1, 2)} <= modes
    for k in kernels:
        # IEEE fp32 is FMA, as torch's own matmul under "highest"; TF32 and bf16 are MMA
        assert k["mma"] == (k["precision"] != "ieee"), k


@sm90
def test_contrastive_uses_wgmma_and_fits_shared_memory(static_report):
    """At the block sizes a GPU launch takes (triton_contrastive.fwd_config / bwd_config), the contrastive kernels
    issue Hopper's wgmma under TF32 and bf16 and fit an SM's 227 KiB of shared memory."""
    kernels = [k for k in static_report["triton"]["kernels"] if k["family"] == "contrastive"]
    assert kernels
    for k in kernels:
        assert k["wgmma"] == (k["precision"] in ("tf32", "bf16")), k
        assert k["shared_bytes"] <= 227 * 1024, k


def test_the_contract_check_flags_what_it_should():
    spill = {"direction": "forward", "dtype": "float32", "M": 4, "stack_bytes": 0, "spill_stores": 8,
             "spill_loads": 8, "registers": 255, "kernel": "k"}
    stack = dict(spill, spill_stores=0, spill_loads=0, stack_bytes=600)
    fp64 = dict(spill, dtype="float64")
    report = {"cuda": {"files": [{"file": "a.cu", "returncode": 0, "errors": "", "kernels": [spill, stack, fp64]}]},
              "triton": {"kernels": [{"family": "contrastive", "kernel": "_contrastive_fwd_kernel", "precision": "tf32",
                                      "mma": False, "spill_stores": 0, "spill_loads": 0, "d": 512}]}}
    problems = static_check.check(report)
    assert len(problems) == 3, problems  # the spill, the stack frame, the missing MMA; fp64 is exempt


def test_build_time_model():
    """build_seconds schedules files longest first on the workers, as ninja does with MAX_JOBS."""
    assert static_check.build_seconds([10.0, 9.0, 1.0, 1.0], 2) == 11.0
    assert static_check.build_seconds([5.0] * 32, 16) == 10.0


@sm90
@needs_nvcc
def test_build_time_prediction(static_report):
    """The 16-core CUDA build time is predicted from each file's nvcc time in the report."""
    seconds = [f["seconds"] for f in static_report["cuda"]["files"]]
    assert all(s > 0 for s in seconds)
    predicted = static_check.summary(static_report)["cuda_build_seconds_on_16_cores_predicted"]
    assert max(seconds) <= predicted <= max(max(seconds), sum(seconds) / 16) * 2


def test_ptx_loops_finds_the_rotation_loop():
    """--scan's sweep cost reads loop bodies off the PTX: a back-edge to an earlier label is a loop, its body the
    lines in between (instructions only), and the rotation loop is the innermost one taking a square root."""
    ptx = """
$L__BB0_1:
\tsetp.lt.s32 \t%p1, %r1, 4;
$L__BB0_2:
\tbar.sync \t0;
\tsqrt.rn.f32 \t%r2, %r3;
\t// a comment
\tadd.s32 \t%r4, %r4, 1;
\t@%p2 bra \t$L__BB0_2;
\tbar.sync \t0;
\t@%p1 bra \t$L__BB0_1;
\tbra.uni \t$L__BB0_3;
$L__BB0_3:
\tret;
"""
    loops = static_check.ptx_loops(ptx)
    assert [(lp["instructions"], lp["barriers"], lp["sqrt"]) for lp in loops] == [(4, 1, True), (7, 2, True)]
    assert static_check.rotation_loop(loops) is loops[0]


def _tree(root: Path) -> Path:
    """A copy of the inputs of both parts of the static check."""
    shutil.copytree(ROOT / "csrc", root / "csrc", ignore=shutil.ignore_patterns("tests"))
    shutil.copytree(ROOT / "pmrl_kernels", root / "pmrl_kernels", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    return root


def test_static_keys_follow_their_inputs(tmp_path, monkeypatch):
    """The CUDA result is keyed on the .cu files and headers, the Triton result on the launchers' modules and what
    they import, both on the compilers; neither on where the tree is."""
    monkeypatch.setattr(static_check, "_toolchain", lambda part: "compilers 1")
    keys = []
    for tree in (_tree(tmp_path / "a"), _tree(tmp_path / "b")):
        monkeypatch.setattr(static_check, "ROOT", tree)
        keys.append({part: static_check.part_key(part) for part in ("cuda", "triton")})
    assert keys[0] == keys[1] and keys[0]["cuda"] != keys[0]["triton"]
    for edited, changes in (("csrc/cuda/gram_eig_forward_m2_4.cu", {"cuda"}), ("csrc/include/pmrl/eigen.h", {"cuda"}),
                            ("pmrl_kernels/ops/triton_gram.py", {"triton"}), ("pmrl_kernels/constants.py", {"triton"}),
                            ("pmrl_kernels/terms.py", {"triton"}), ("pmrl_kernels/bench/cli.py", set()),
                            ("pmrl_kernels/loss.py", set()), ("pmrl_kernels/__init__.py", set()),
                            ("csrc/cpu/kernels.h", set())):
        before = {part: static_check.part_key(part) for part in ("cuda", "triton")}
        path = tree / edited
        path.write_text(path.read_text() + ("\n# edited\n" if path.suffix == ".py" else "\n// edited\n"))
        after = {part: static_check.part_key(part) for part in ("cuda", "triton")}
        assert {part for part in after if after[part] != before[part]} == changes, edited
    monkeypatch.setattr(static_check, "_toolchain", lambda part: "compilers 2")
    assert all(static_check.part_key(part) != after[part] for part in after)


def test_static_results_are_cached_by_source_hash(tmp_path, monkeypatch):
    """An unchanged tree reads the stored result; an edited one compiles again; a failed or skipped compile is not
    stored."""
    tree = _tree(tmp_path / "tree")
    monkeypatch.setattr(static_check, "ROOT", tree)
    monkeypatch.setattr(static_check, "_toolchain", lambda part: "compilers")
    monkeypatch.setenv("PMRL_STATIC_CACHE", str(tmp_path / "cache"))
    calls = []

    def compile_(error=False):
        calls.append(error)
        return {"status": "ok", "kernels": [{"kernel": "k", "call": len(calls), **({"error": "x"} if error else {})}]}

    first = static_check.cached("triton", compile_)
    again = static_check.cached("triton", compile_)
    assert len(calls) == 1 and not first["cache"]["hit"] and again["cache"]["hit"]
    assert again["kernels"] == first["kernels"] and Path(again["cache"]["path"]).parent == tmp_path / "cache"
    source = tree / "pmrl_kernels" / "ops" / "triton_gram.py"
    source.write_text(source.read_text() + "\n# edited\n")
    edited = static_check.cached("triton", lambda: compile_(error=True))
    assert len(calls) == 2 and not edited["cache"]["hit"] and edited["cache"]["path"] is None
    assert static_check.cached("triton", compile_)["kernels"][0]["call"] == 3  # the failure was not kept
    skipped = {"status": "skipped", "reason": "no compiler"}
    source.write_text(source.read_text() + "\n# edited again\n")
    assert static_check.cached("triton", lambda: skipped)["cache"] == {
        "key": static_check.part_key("triton"), "path": None, "hit": False}
    assert not static_check.cached("triton", compile_)["cache"]["hit"]  # nor was the skip
