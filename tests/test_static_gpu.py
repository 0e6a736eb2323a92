"""What the compilers say about every kernel for sm_90, without a GPU (benchmarks/static_check.py; the report is
computed once per session by conftest.static_report): every .cu file compiles with a bare nvcc, every Triton
kernel compiles with the specialisation a real launch gets (the Gram kernels on both paths), nothing spills for
M <= 8, the CUDA stack frames stay under 512 bytes, and the contrastive kernels use MMA instructions under TF32 and
bf16; the README's predicted bytes and times are the Gram kernels' byte model."""
import importlib.util
import shutil
from pathlib import Path

import pytest

from pmrl_kernels.ops import triton_contrastive, triton_gram

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("static_check", ROOT / "benchmarks" / "static_check.py")
static_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(static_check)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
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
    clean = [k for k in kernels if k["M"] <= static_check.MAX_CLEAN_M and k["dtype"] != "float64"]
    bad = [k for k in clean if k["spill_stores"] or k["spill_loads"] or k["stack_bytes"] >= 512]
    assert not bad, bad


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


def test_gram_kernels_compile_on_both_paths(static_report):
    """Forward and backward, resident (the instance loaded once) and chunked, each at some M <= 8: the no-spill
    contract covers both paths."""
    gram = [k for k in static_report["triton"]["kernels"]
            if k["family"] == "gram" and k["m"] <= static_check.MAX_CLEAN_M]
    assert {(k["kernel"], k["resident"]) for k in gram} == {
        (kernel, resident) for kernel in ("_gram_eig_fwd_kernel", "_gram_eig_bwd_kernel") for resident in (True, False)}


def test_readme_predictions_are_the_byte_model():
    """README's GPU section shows static_check.byte_model_table() as it is (`static_check.py --bytes`)."""
    assert static_check.byte_model_table() in (ROOT / "README.md").read_text()


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


def test_build_time_prediction(static_report):
    """The 16-core CUDA build time is predicted from each file's measured nvcc time, longest file first."""
    assert static_check.build_seconds([10.0, 9.0, 1.0, 1.0], 2) == 11.0
    assert static_check.build_seconds([5.0] * 32, 16) == 10.0
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
