"""benchmarks/gpu_check.{sh,py}, the one-command GPU acceptance run: its dry run on the CPU, and the parts of its
logic that only the GPU run reaches (error verdicts, combo sampling, sanitizer/ncu/pytest log parsing).

The dry run is skipped under PMRL_GPU_CHECK=1: that is the GPU run itself running the suite."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pmrl_kernels as pk

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gc = _load()


# ----------------------------------------------------------------------------------------------- verdicts

def test_rel_err_and_verdict_flag_a_perturbed_result():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(64, 32, generator=g, dtype=torch.float64)
    close = ref.float()  # float32 rounding only
    wrong = ref * (1 + 1e-2 * torch.randn(ref.shape, generator=g, dtype=torch.float64))
    assert gc.rel_err(close, ref) < 1e-7
    assert gc.verdict(gc.rel_err(close, ref), gc.THRESHOLDS["float32"]["S"])["ok"]
    bad = gc.verdict(gc.rel_err(wrong, ref), gc.THRESHOLDS["float32"]["S"])
    assert not bad["ok"] and bad["err"] > 1e-3
    # the reference's own error in the kernel's dtype widens the bound (singular points), but only that far
    assert gc.verdict(2e-4, 1e-4, baseline=2e-4)["ok"]
    assert not gc.verdict(5e-4, 1e-4, baseline=2e-4)["ok"]


def test_rel_err_non_finite_and_zero():
    ref = torch.tensor([1.0, float("nan"), 2.0], dtype=torch.float64)
    assert gc.rel_err(ref.clone(), ref) == 0.0  # NaN where the reference has NaN is right
    assert gc.rel_err(torch.tensor([1.0, 0.0, 2.0]), ref) == math.inf
    assert gc.rel_err(torch.zeros(3), torch.zeros(3)) == 0.0
    # an all-zero reference (the gradient through the normalisation at D = 1): the RMS error
    assert gc.rel_err(torch.full((4,), 3e-5), torch.zeros(4)) == pytest.approx(3e-5)
    assert not gc.verdict(gc.rel_err(torch.ones(3), torch.zeros(3)), gc.THRESHOLDS["float32"]["grad"])["ok"]
    assert gc.rel_err(torch.ones(4), torch.ones(3)) == math.inf
    assert not gc.verdict(math.inf, 1.0)["ok"]


class _WrongBackend:
    """The public API, except that backend "wrong" returns the reference scaled by 1.001: what the GPU run's
    correctness step must flag."""

    def gram_svd(self, emb, *, normalize, backend):
        out = pk.gram_svd(emb, normalize=normalize, backend="reference" if backend == "wrong" else backend)
        if backend != "wrong":
            return out
        return type(out)(out.S * 1.001, out.U, out.lead * 1.001)

    def pmrl_loss(self, emb, *, backend, **kw):
        loss = pk.pmrl_loss(emb, backend="reference" if backend == "wrong" else backend, **kw)
        return loss * 1.001 if backend == "wrong" else loss


@pytest.mark.parametrize("layout", gc.LAYOUTS)
def test_compare_case_flags_a_wrong_backend_and_passes_the_reference(layout):
    x = gc.seeded_randn(torch, (16, 3, 24), 0, "cpu", torch.float32)
    res = gc.compare_case(torch, _WrongBackend(), x, backend="wrong", layout=layout, normalize=True,
                          grad_s_top_only=False, seed=0)
    assert not res["S"]["ok"] and not res["loss"]["ok"] and not res["lead"]["ok"]
    res = gc.compare_case(torch, pk, x, backend="reference", layout=layout, normalize=True,
                          grad_s_top_only=False, seed=0)
    assert all(v["ok"] for v in res.values()), res


class _FlippedColumn:
    """The public API, except that backend "flipped" negates U's last column: the gradients, which use
    u_k u_k^T, and S, lead and the loss do not change; only the U check can see a wrong non-leading column (the
    H200's chunked Triton forward wrote one in run 4)."""

    def gram_svd(self, emb, *, normalize, backend):
        out = pk.gram_svd(emb, normalize=normalize, backend="reference")
        if backend != "flipped":
            return out
        return type(out)(out.S, torch.cat([out.U[..., :-1], -out.U[..., -1:]], -1), out.lead)

    def pmrl_loss(self, emb, *, backend, **kw):
        return pk.pmrl_loss(emb, backend="reference", **kw)


def test_compare_case_flags_a_flipped_eigenvector_column():
    x = gc.seeded_randn(torch, (16, 3, 24), 0, "cpu", torch.float32)
    res = gc.compare_case(torch, _FlippedColumn(), x, backend="flipped", layout="list", normalize=True,
                          grad_s_top_only=False, seed=0)
    assert not res["U"]["ok"] and res["U"]["columns_compared"] > 16, res["U"]
    assert all(v["ok"] for q, v in res.items() if q != "U"), res


def test_variants_case_checks_every_cuda_lane_count_and_restores_the_environment(monkeypatch):
    """gpu_check's correctness check of the CUDA lane counts (CUDA_VARIANTS), run here on the reference: every lane
    count in fp32 and bf16 passes, a wrong backend fails, and PMRL_CUDA_MAX_LANES is put back."""
    monkeypatch.delenv("PMRL_CUDA_MAX_LANES", raising=False)
    seen = []

    class Recording(_WrongBackend):
        def gram_svd(self, emb, *, normalize, backend):
            seen.append(os.environ.get("PMRL_CUDA_MAX_LANES"))
            return super().gram_svd(emb, normalize=normalize, backend=backend)

    res = gc.variants_case(torch, Recording(), "cpu", "cuda", backend="reference", size=(64, 4, 512))
    assert res["status"] == "ok" and len(res["backends"]) == 2 * len(gc.CUDA_VARIANTS), res
    assert {v["PMRL_CUDA_MAX_LANES"] for v in gc.CUDA_VARIANTS.values()} <= set(seen)
    assert "PMRL_CUDA_MAX_LANES" not in os.environ
    assert gc.variants_case(torch, _WrongBackend(), "cpu", "cuda", backend="wrong",
                            size=(64, 4, 512))["status"] == "failed"


def test_with_env_sets_only_its_variables_and_puts_them_back(monkeypatch):
    """The CUDA lane variants are timed through with_env at every call: it sets and restores its own variables
    (a value that was there comes back, one that was not goes) and leaves the rest of the environment alone."""
    monkeypatch.setenv("PMRL_CUDA_MAX_LANES", "16")
    monkeypatch.delenv("GPU_CHECK_UNSET_VARIABLE", raising=False)
    monkeypatch.setenv("GPU_CHECK_OTHER", "kept")
    seen = gc.with_env(lambda: (os.environ["PMRL_CUDA_MAX_LANES"], os.environ["GPU_CHECK_UNSET_VARIABLE"],
                                os.environ["GPU_CHECK_OTHER"]),
                       {"PMRL_CUDA_MAX_LANES": "8", "GPU_CHECK_UNSET_VARIABLE": "1"})()
    assert seen == ("8", "1", "kept")
    assert os.environ["PMRL_CUDA_MAX_LANES"] == "16" and "GPU_CHECK_UNSET_VARIABLE" not in os.environ

    def fails():
        raise RuntimeError("kernel")
    with pytest.raises(RuntimeError):
        gc.with_env(fails, {"PMRL_CUDA_MAX_LANES": "4"})()
    assert os.environ["PMRL_CUDA_MAX_LANES"] == "16"


def _fault_entry(wrong_variant=None):
    verdict = {"ok": True, "err": 1e-7}
    backends = {name: {"S": dict(verdict), "U": dict(verdict, ok=name != wrong_variant)}
                for name in ("chunked", "chunked-aligned-stride", "one-pass")}
    return {"check": "chunked_fault", "status": "failed" if wrong_variant else "ok", "backends": backends}


def test_correctness_outcome_reports_the_chunked_fault_without_failing_the_kernels():
    """The known fault's diagnosis names its wrong variants in the step's line and does not fail the step; any
    other failed check does."""
    rows = [{"backend": "cuda", "case": "random", "dtype": "float32", "status": "ok"}]
    status, reason = gc.correctness_outcome(rows, [_fault_entry("chunked")], ["cuda", "triton"], [])
    assert status == "ok", reason
    assert "1/1 checks pass" in reason and "chunked_fault (diagnosis): failed, wrong: chunked" in reason, reason
    status, reason = gc.correctness_outcome(rows + [dict(rows[0], backend="triton", status="failed")],
                                            [_fault_entry()], ["cuda", "triton"], [])
    assert status == "failed" and "first failure: triton random" in reason, reason
    assert "chunked_fault (diagnosis): ok" in reason and "wrong:" not in reason, reason


def test_variants_case_checks_the_triton_variants_that_differ_with_their_knobs_set():
    """The Triton variants the bench times beside "triton" at the benchmark's M and D (not the cyclic ordering,
    which "triton" takes at M = 4), each run with its knobs set, and the knobs put back."""
    from pmrl_kernels.ops import triton_gram

    knobs = ("RESIDENT_ELEMENTS", "NUM_WARPS", "CYCLIC_JACOBI_MAX_M")
    before = {k: getattr(triton_gram, k) for k in knobs}
    seen = []

    class Recording(_WrongBackend):
        def gram_svd(self, emb, *, normalize, backend):
            seen.append({k: getattr(triton_gram, k) for k in knobs})
            return super().gram_svd(emb, normalize=normalize, backend=backend)

    res = gc.variants_case(torch, Recording(), "cpu", "triton", backend="reference", size=(16, 4, 512))
    expected = {"triton-chunked", "triton-1-warp", "triton-2-warps", "triton-parallel"}
    assert res["status"] == "ok" and set(res["backends"]) == {f"{n}:float32" for n in expected}, res
    for name in expected:
        assert dict(before, **gc.TRITON_VARIANTS[name]) in seen, name
    assert {k: getattr(triton_gram, k) for k in knobs} == before
    assert gc.variants_case(torch, _WrongBackend(), "cpu", "triton", backend="wrong",
                            size=(16, 4, 512))["status"] == "failed"


def test_layouts_hold_the_values_with_the_advertised_strides():
    x = gc.seeded_randn(torch, (5, 3, 7), 1, "cpu", torch.float32)
    for layout in gc.LAYOUTS:
        emb, wrt = gc.make_layout(x, layout)
        got = torch.stack(emb, 1) if layout == "list" else emb
        assert torch.equal(got.detach(), x), layout
        assert all(t.requires_grad and t.is_leaf for t in wrt), layout
    assert gc.make_layout(x, "offset")[0].storage_offset() == 1
    assert gc.make_layout(x, "padded")[0].stride() == (3 * (7 + gc.PAD), 7 + gc.PAD, 1)
    assert gc.make_layout(x, "transposed")[0].stride()[-1] == 5 * 3
    assert all(t.is_contiguous() for t in gc.make_layout(x, "list")[0])


def test_sampled_combos_cover_every_value_and_are_deterministic():
    for backend in ("cuda", "triton"):
        combos = gc.sanitize_combos(backend, 12, seed=1234)
        assert combos == gc.sanitize_combos(backend, 12, seed=1234)
        assert len(combos) == 12 and len({tuple(sorted(c.items())) for c in combos}) == 12
        axes = {"dtype": gc.BACKEND_DTYPES[backend], "M": [2, 3, 5, 9, 16], "D": [1, 3, 129, 513],
                "B": [1, 7, 33], "layout": gc.LAYOUTS, "normalize": [True, False]}
        for key, values in axes.items():
            assert {c[key] for c in combos} == set(values), key


# ----------------------------------------------------------------------------------------------- log parsers

NCU_CSV = """==PROF== Connected to process 123 (/usr/bin/python3.12)
==PROF== Profiling "spin_kernel" - 0: 0%....50%....100% - 1 pass
"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","123","python3.12","127.0.0.1","spin_kernel","1","7","(1, 1, 1)","(1, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","0"
"1","123","python3.12","127.0.0.1","forward_kernel","1","7","(256, 1, 1)","(4096, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","536,870,912"
"1","123","python3.12","127.0.0.1","forward_kernel","1","7","(256, 1, 1)","(4096, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_write.sum","Mbyte","134.22"
"1","123","python3.12","127.0.0.1","forward_kernel","1","7","(256, 1, 1)","(4096, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","usecond","190.5"
"2","123","python3.12","127.0.0.1","spin_kernel","1","7","(1, 1, 1)","(1, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","0"
"3","123","python3.12","127.0.0.1","backward_kernel","1","7","(256, 1, 1)","(4096, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_read.sum","byte","540000000"
"3","123","python3.12","127.0.0.1","backward_kernel","1","7","(256, 1, 1)","(4096, 1, 1)","0","9.0","Command line profiler metrics","dram__bytes_write.sum","byte","536870912"
"3","123","python3.12","127.0.0.1","backward_kernel","1","7","(256, 1, 1)","(4096, 1, 1)","0","9.0","Command line profiler metrics","gpu__time_duration.sum","nsecond","300000"
"3","123","python3.12","127.0.0.1","backward_kernel","1","7","(256, 1, 1)","(4096, 1, 1)","0","9.0","Command line profiler metrics","sm__throughput.avg.pct_of_peak_sustained_elapsed","%","37.5"
"3","123","python3.12","127.0.0.1","backward_kernel","1","7","(256, 1, 1)","(4096, 1, 1)","0","9.0","Command line profiler metrics","sm__warps_active.avg.pct_of_peak_sustained_active","%","61.25"
"3","123","python3.12","127.0.0.1","backward_kernel","1","7","(256, 1, 1)","(4096, 1, 1)","0","9.0","Command line profiler metrics","smsp__inst_executed.sum","inst","12,345,678"
"3","123","python3.12","127.0.0.1","backward_kernel","1","7","(256, 1, 1)","(4096, 1, 1)","0","9.0","Command line profiler metrics","launch__registers_per_thread","register/thread","96"
==PROF== Disconnected from process 123
"""


def test_ncu_csv_is_parsed_and_attributed_by_the_spin_markers():
    kernels = gc.parse_ncu_csv(NCU_CSV)
    assert [k["kernel"] for k in kernels] == ["spin_kernel", "forward_kernel", "spin_kernel", "backward_kernel"]
    rows = gc.ncu_rows(kernels, [{"backend": "cuda", "pass": "fwd"}, {"backend": "cuda", "pass": "bwd"}],
                       65536, 4, 512)
    fwd, bwd = rows
    assert (fwd["backend"], fwd["pass_"], bwd["pass_"]) == ("cuda", "fwd", "bwd")
    assert fwd["dram_read_bytes"] == 536870912 and fwd["dram_write_bytes"] == pytest.approx(134.22e6)
    assert fwd["time_s"] == pytest.approx(190.5e-6)
    assert fwd["bytes_over_floor"] == pytest.approx((536870912 + 134.22e6) / 536870912)
    assert bwd["bytes_over_floor"] == pytest.approx((540000000 + 536870912) / (2 * 536870912))
    assert (bwd["sm_pct"], bwd["occupancy_pct"], bwd["warp_instructions"], bwd["registers"]) == (
        37.5, 61.25, 12345678, 96)
    assert fwd["sm_pct"] is None and fwd["registers"] is None  # metrics ncu did not report stay empty
    assert gc.parse_ncu_csv("==ERROR== no kernels were profiled\n") == []


def test_sanitizer_log_counts(tmp_path):
    log = tmp_path / "memcheck.log"
    log.write_text("========= COMPUTE-SANITIZER\n"
                   "========= Invalid __global__ read of size 4 bytes\n"
                   "=========     at forward_kernel+0x1a0\n"
                   "========= Program hit cudaErrorInvalidValue (error 1) due to \"invalid argument\" on CUDA API call\n"
                   "some program output\n"
                   "========= ERROR SUMMARY: 2 errors\n"
                   "========= ERROR SUMMARY: 0 errors\n")
    res = gc.parse_sanitizer_log(str(log))
    assert res["error_summary"] == 2 and res["summaries_found"] == 2
    assert res["kernel_error_lines"] == 1 and res["api_error_lines"] == 1
    assert gc.parse_sanitizer_log(str(tmp_path / "missing.log"))["error_summary"] is None


def test_racecheck_log_counts_its_own_summary(tmp_path):
    """racecheck ends with RACECHECK SUMMARY, not ERROR SUMMARY: its errors count, its warnings (benign hazards)
    are reported without failing, and an error fails the sanitizer step."""
    log = tmp_path / "racecheck.log"
    log.write_text("========= COMPUTE-SANITIZER\n"
                   "========= Error: Race reported between Write access at _gram_eig_fwd_kernel+0x3a0\n"
                   "=========     and Read access at _gram_eig_fwd_kernel+0x3c0 [4 hazards]\n"
                   "========= Warning: Race reported between Write access at _gram_eig_fwd_kernel+0x1a0\n"
                   "========= RACECHECK SUMMARY: 2 hazards displayed (1 errors, 1 warnings)\n")
    res = gc.parse_sanitizer_log(str(log))
    assert res["error_summary"] == 1 and res["race_warnings"] == 1 and res["kernel_error_lines"] == 1, res
    (tmp_path / "sanitize_racecheck.json").write_text(json.dumps(
        {"status": "ok", "done": 3, "planned": 12, "failures": [], "backends": ["triton"]}))
    run = {"tag": "sanitizer:racecheck", "rc": 0, "seconds": 20.0, "budget_s": 28.0, "log": str(log)}
    status, reason = gc.parse_sanitizer(tmp_path, [run], {})
    assert status == "failed" and "racecheck: 1 errors" in reason and "1 race warnings" in reason, reason
    log.write_text("========= COMPUTE-SANITIZER\n"
                   "========= Warning: Race reported between Write access at _gram_eig_fwd_kernel+0x1a0\n"
                   "========= RACECHECK SUMMARY: 1 hazard displayed (0 errors, 1 warning)\n")
    status, reason = gc.parse_sanitizer(tmp_path, [run], {})
    assert status == "ok", reason


@pytest.mark.parametrize("done, status", [(0, "failed"), (3, "ok")])
def test_sanitizer_step_that_ran_no_combination_fails(tmp_path, done, status):
    """Seen on the H200: runs whose budget went to starting CUDA ran nothing; that is no pass."""
    runs = []
    for tool in ("plain", "memcheck"):
        (tmp_path / f"sanitize_{tool}.json").write_text(json.dumps(
            {"status": "ok", "done": done, "planned": 12, "failures": [], "backends": ["triton"]}))
        log = tmp_path / f"{tool}.log"
        log.write_text("========= COMPUTE-SANITIZER\n========= ERROR SUMMARY: 0 errors\n")
        runs.append({"tag": f"sanitizer:{tool}", "rc": 0, "seconds": 9.0, "budget_s": 18.0, "log": str(log)})
    got, reason = gc.parse_sanitizer(tmp_path, runs, {})
    assert got == status, reason
    assert ("no combination ran" in reason) == (done == 0)


def test_racecheck_runs_triton_only_and_the_chunked_fault_first(tmp_path):
    """racecheck looks for shared-memory hazards: Triton's kernels (the CUDA ones use warp shuffles), led by the
    input Triton's chunked forward got wrong on the H200; the interpreter gets it right, so the dry run records
    it as ok, and the sanitizer step's line says so."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "sanitize", "--dry-run",
                          "--tag", "racecheck", "--sample", "1", "--out", str(tmp_path), "--budget", "60"],
                         check=True, capture_output=True, text=True, cwd=ROOT).stdout
    driver = json.loads((tmp_path / ".steps" / "sanitizer.json").read_text())
    assert driver["backends"] == ["triton"] and driver["done"] == 1
    fault = driver["chunked_fault"]
    assert fault["status"] == "ok", fault
    assert set(fault["backends"]) >= {"chunked", "one-pass"}
    # each variant announced in the log before it runs: racecheck's hazards print under the variant they belong to
    markers = [line.split()[-1] for line in out.splitlines() if line.startswith("== chunked_fault variant ")]
    assert markers == list(fault["backends"]), out
    # the GPU run's parse of the same driver file
    steps = tmp_path / "gpu"
    steps.mkdir()
    (steps / "sanitize_racecheck.json").write_text(json.dumps(dict(driver, status="ok")))
    log = tmp_path / "racecheck.log"
    log.write_text("========= COMPUTE-SANITIZER\n"
                   "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n")
    run = {"tag": "sanitizer:racecheck", "rc": 0, "seconds": 20.0, "budget_s": 28.0, "log": str(log)}
    data = {}
    status, reason = gc.parse_sanitizer(steps, [run], data)
    assert status == "ok" and "racecheck: 0 errors" in reason and "chunked_fault ok" in reason, reason
    assert data["racecheck"]["chunked_fault"] == "ok" and "wrong:" not in reason
    assert data["racecheck"]["chunked_fault_wrong"] == []
    # a variant that goes wrong under the sanitizer is named in the step's line
    (steps / "sanitize_racecheck.json").write_text(json.dumps(dict(driver, status="ok",
                                                                   chunked_fault=_fault_entry("chunked"))))
    status, reason = gc.parse_sanitizer(steps, [run], data)
    assert "chunked_fault failed (wrong: chunked)" in reason, reason
    assert data["racecheck"]["chunked_fault_wrong"] == ["chunked"]


@pytest.mark.parametrize("text,rc,status,counts", [
    ("....s..\n5 passed, 1 skipped in 3.2s\n", 0, "ok", {"passed": 5, "skipped": 1}),
    ("..F\nFAILED tests/test_x.py::test_y - AssertionError: no\n1 failed, 2 passed in 1.0s\n", 1, "failed",
     {"failed": 1, "passed": 2}),
    # cut short under -v with xdist: counted from the per-test lines, failures named
    ("[gw0] [  1%] PASSED tests/test_a.py::test_b[cuda] \n[gw1] [  2%] FAILED tests/test_a.py::test_c \n"
     "[gw0] [  3%] SKIPPED tests/test_a.py::test_d \n[gw2] [  4%] PASSED tests/test_e.py::test_f ", 124, "failed",
     {"passed": 2, "failed": 1, "errors": 0, "skipped": 1, "partial": True}),
])
def test_pytest_log_parsing(tmp_path, text, rc, status, counts):
    log = tmp_path / "pytest.log"
    log.write_text(text)
    data = {}
    got, _ = gc.parse_pytest(tmp_path, [{"rc": rc, "seconds": 1.0, "log": str(log)}], data)
    assert got == status and data["counts"] == counts
    assert len(data["failures"]) == counts.get("failed", 0)


def test_gram_variants_change_the_launches():
    """Each Triton gram variant gpu_check times launches other kernels than "triton" at one of the benchmark's
    sizes (D = 512, M = 4 or 16), and variant_differs leaves out the cells that would time "triton" again: the
    cyclic ordering where it is the default (M = 4), the parallel one at M = 16, the path variants at M = 16
    (chunked either way). The knobs are put back."""
    triton_gram = pytest.importorskip("pmrl_kernels.ops.triton_gram")
    before = {k: getattr(triton_gram, k) for knobs in gc.TRITON_VARIANTS.values() for k in knobs}
    differs = {p: [m for m in (4, 16) if gc.variant_differs(p, m, 512, "float32")] for p in gc.TRITON_VARIANTS}
    assert differs == {"triton-chunked": [4], "triton-1-warp": [4, 16],
                       "triton-2-warps": [4, 16], "triton-cyclic": [16], "triton-parallel": [4]}, differs
    assert {k: getattr(triton_gram, k) for k in before} == before


@pytest.mark.parametrize("m,d", [(4, 32), (4, 512), (16, 512), (3, 10)])
def test_disjoint_rows_skip_the_eigen_solve(m, d):
    """The bench's "-diag" cells: disjoint_rows keeps each row on its own block of features, so the Gram matrix is
    diagonal and the kernels' Jacobi solves return without a rotation: U holds only 0 and +-1 (a rotation would
    leave other values), while S are the rows' norms."""
    zs = [t.requires_grad_() for t in torch.randn(6, m, d, generator=torch.Generator().manual_seed(m + d)).unbind(1)]
    zd = gc.disjoint_rows(torch, zs)
    z = torch.stack(zd, 1)
    assert not any(t.requires_grad for t in zd)
    assert all(torch.equal(a[b != 0], b[b != 0]) for a, b in zip(zs, zd))  # the values kept are the input's
    gram = z @ z.transpose(1, 2)
    assert torch.equal(gram, torch.diag_embed(torch.diagonal(gram, dim1=1, dim2=2)))
    assert (torch.diagonal(gram, dim1=1, dim2=2) > 0).all()  # every row keeps some features
    for backend in [b for b in ("cpp", "triton") if b in pk.available_backends("cpu")]:
        s, u, _ = pk.gram_svd(zd, normalize=False, backend=backend)
        assert set(u.unique().tolist()) <= {-1.0, 0.0, 1.0}, backend
        torch.testing.assert_close(s, z.norm(dim=2).sort(dim=1, descending=True).values, msg=backend)


def test_pytest_runs_add_up(tmp_path):
    """The step runs pytest once per group of test files: counts add up, one run cut short fails the step."""
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    logs[0].write_text("FAILED tests/test_a.py::test_b - AssertionError: no\n1 failed, 3 passed in 2.0s\n")
    logs[1].write_text("[gw0] [  1%] PASSED tests/test_c.py::test_d \n")
    runs = [{"rc": 1, "seconds": 2.0, "log": str(logs[0])}, {"rc": 124, "seconds": 9.0, "log": str(logs[1])}]
    data = {}
    status, reason = gc.parse_pytest(tmp_path, runs, data)
    assert status == "failed" and "timed out after 11 s" in reason
    assert data["counts"] == {"failed": 1, "passed": 4, "errors": 0, "skipped": 0, "partial": True}
    assert data["failures"] == ["FAILED tests/test_a.py::test_b - AssertionError: no"]


def test_failures_print_their_traceback_at_once_inside_gpu_check(tmp_path):
    """A pytest run that gpu_check.sh cuts short still holds the tracebacks of the tests that failed before."""
    (tmp_path / "conftest.py").write_text(f"from importlib.util import spec_from_file_location, module_from_spec\n"
                                          f"spec = spec_from_file_location('c', {str(ROOT / 'tests' / 'conftest.py')!r})\n"
                                          f"c = module_from_spec(spec); spec.loader.exec_module(c)\n"
                                          f"pytest_runtest_logreport = c.pytest_runtest_logreport\n")
    # test_b ends the process as gpu_check.sh's timeout would: pytest never reaches its summary
    (tmp_path / "test_x.py").write_text("import os\n\ndef test_a():\n    assert 1 == 2, 'the reason'\n\n"
                                        "def test_b():\n    os._exit(3)\n")
    env = dict(os.environ, PMRL_GPU_CHECK="1")
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(tmp_path)], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "=== FAILED test_x.py::test_a (call)" in result.stdout and "the reason" in result.stdout, result.stdout


# ----------------------------------------------------------------------------------------------- the dry run

@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PMRL_GPU_CHECK") == "1", reason="inside gpu_check.sh's own GPU run")
def test_dry_run_records_every_step(tmp_path, static_report):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, GPU_CHECK_STATIC_REPORT=static_report["path"],
               GPU_CHECK_COMMIT="0123abc")
    env.pop("GPU_CHECK_TOTAL_S", None)
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "correctness" in result.stdout and "step" in result.stdout  # summary.txt printed at the end

    files = sorted(p.name for p in out.iterdir())
    assert set(files) <= set(gc.OUT_FILES) and len(files) <= 8, files  # what comes back from the GPU machine
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True
    steps = summary["steps"]
    for name in gc.STEP_ORDER:
        assert steps[name]["status"] in ("ok", "failed", "skipped"), (name, steps[name])
        assert steps[name]["reason"], name
    for name in ("build", "sanitizer", "ncu"):
        assert steps[name]["status"] == "skipped" and "no GPU" in steps[name]["reason"], steps[name]
    for name in ("env", "static", "bandwidth", "correctness", "bench"):
        assert steps[name]["status"] == "ok", (name, steps[name])
    assert steps["env"]["git_commit"] == "0123abc"  # the commit the caller sent, not the checkout's
    # the compilers' report: nothing spills for M <= 8, MMA in the contrastive kernels under TF32 and bf16
    static = steps["static"]
    assert static["cuda_spill_bytes_m_le_8"] == 0 and static["triton_spill_bytes_m_le_8"] == 0, static
    assert static["triton_contrastive_mma"]["tf32"] and static["triton_contrastive_mma"]["bf16"], static

    corr = steps["correctness"]
    # the dry run sets TRITON_INTERPRET=1, as conftest.py does for this process
    cpu_backends = [b for b in gc.KERNEL_BACKENDS_CPU if b in pk.available_backends("cpu")]
    assert cpu_backends and corr["backends"] == cpu_backends
    for backend in cpu_backends:
        rows = [r for r in corr["rows"] if r["backend"] == backend and r["status"] != "skipped"]
        assert rows, f"no correctness rows for {backend}"
        for r in rows:
            assert r["status"] == "ok", r
            for q, v in r["checks"].items():
                assert v["ok"] and v["err"] <= v["limit"], (backend, r["case"], q, v)
    assert not [r for r in corr["rows"] if r["status"] == "failed"]
    large = next(s for s in corr["special"] if s["check"] == "large_bf16")
    assert large["status"] in ("ok", "skipped"), large

    bench = steps["bench"]["rows"]
    assert any(r["status"] == "ok" and r["median_ms"] > 0 for r in bench)
    assert all(r["device"] and r["dtype"] and r["M"] and r["B"] and r["D"] for r in bench)
    assert json.loads((out / "bench.json").read_text())["direct"] == bench
    assert (out / "summary.txt").read_text().startswith("gpu_check")


def test_bench_cells_say_why_a_cell_has_no_time():
    """A recipe call that failed after its probe says failed (not the prediction the probe made), an OOM says OOM
    (not the GiB its message names), a cell skipped for its predicted time or memory says that prediction."""
    probe = dict(probe_B=256, probe_ms=781.0, predicted_s=200.0, predicted_mem_gib=131.0)
    assert gc.bench_cell_text(dict(status="ok", median_ms=0.40625, copy_fraction=0.31)) == "0.406 (31%)"
    assert gc.bench_cell_text(dict(status="skipped", reason="one call took 2.02 s (cap 2 s)",
                                   single_call_ms=2020.0)) == "2020 once"
    assert gc.bench_cell_text(dict(probe, status="failed", reason="RuntimeError: cusolver")) == "failed"
    assert gc.bench_cell_text(dict(probe, status="skipped",
                                   reason="OOM: Tried to allocate 12.00 GiB")) == "OOM"
    assert gc.bench_cell_text(dict(probe, status="skipped",
                                   reason="predicted 131 GiB from B=256 (free 134 GiB)")) == "skip ~131GiB"
    assert gc.bench_cell_text(dict(probe, status="skipped",
                                   reason="predicted 200.0 s a call from B=256 (781.0 ms; cap 2 s)")) == "skip ~200s"
    assert gc.bench_cell_text(dict(status="skipped", reason="step budget reached")) == "skipped"
    assert gc.bench_cell_text(None) == "-"


def test_summary_of_a_gpu_run_renders_in_60_lines(tmp_path, capsys):
    """summarize on step records shaped like the GPU run's (what the caller sees is the last ~60 lines)."""
    steps, out = tmp_path / "steps", tmp_path / "out"
    steps.mkdir()
    dev = "NVIDIA H200"

    def save(name, **data):
        (steps / f"{name}.json").write_text(json.dumps(dict(step=name, seconds=1.0, budget_s=10, **data)))

    save("env", status="ok", reason="H200", device=dev, capability="sm_90", torch="2.11.0+cu130", triton="3.6.0")
    save("build", status="ok", reason="80 s")
    save("bandwidth", status="ok", reason="copy 4100 GB/s", copy_gbps=4100.0)
    save("sanitizer", status="ok", reason="memcheck: 0 errors, 28/28 combos")
    check = {q: gc.verdict(1e-6, gc.THRESHOLDS["float32"][gc._threshold_key(q)]) for q in gc.QUANTITIES}
    rows = [dict(backend=be, case=case, dtype=dt, B=4096, M=4, D=512, layout="list", normalize=True, device=dev,
                 status="ok", checks=check)
            for be in ("cuda", "triton") for dt in gc.BACKEND_DTYPES[be] for case in ("random", "zero_row")]
    rows.append(dict(rows[0], status="failed", checks={}, reason="RuntimeError: boom"))
    rows[-1].pop("checks")
    special = [dict(check="stream", status="ok", B=4096, M=4, D=512, dtype="float32",
                    backends={"cuda": {"S": gc.verdict(0.0, 1e-4)}}),
               dict(check="large_bf16", status="failed", B=2**20 + 3, M=4, D=520, dtype="bfloat16",
                    instances_checked=219, backends={"cuda": {"S": gc.verdict(1e-7, 1e-4)},
                                                     "triton": {"error": "RuntimeError: illegal memory access"}})]
    save("correctness", status="failed", reason="x", device=dev, rows=rows, special=special)
    bench = []
    for m in (4, 16):
        for dt in ("float32", "bfloat16"):
            for be in ("cuda", "triton"):
                for mode in ("fwd", "fwd+bwd"):
                    bench.append(dict(target="gram_svd", mode=mode, provider=be, dtype=dt, M=m, status="ok",
                                      median_ms=1.5, copy_fraction=0.8, device=dev, B=65536, D=512))
                bench.append(dict(target="gram_svd", mode="fwd", provider=be + gc.DIAGONAL, dtype=dt, M=m,
                                  status="ok", median_ms=0.625, copy_fraction=0.9, device=dev, B=65536, D=512))
                bench.append(dict(target="loss", mode="fwd+bwd", provider=be, reg_weight=0.0, dtype=dt, M=m,
                                  status="ok", median_ms=2.5, copy_fraction=0.5, device=dev, B=65536, D=512))
            for prec, ms in (("ieee", 375.5), ("tf32", 70.25), ("bf16", 40.5)) if m == 4 else ():
                bench.append(dict(target="loss", mode="fwd+bwd", provider="blocked", reg_weight=1.0, precision=prec,
                                  dtype=dt, M=m, device=dev, B=65536, D=512, status="ok", median_ms=ms))
            for prec, ms in (("ieee", None), ("tf32", 61.5), ("bf16", 33.25)) if m == 4 else ():
                bench.append(dict(target="loss", mode="fwd+bwd", provider="triton", reg_weight=1.0, precision=prec,
                                  dtype=dt, M=m, device=dev, B=65536, D=512, **(
                                      dict(status="ok", median_ms=ms) if ms else
                                      dict(status="skipped", reason="one call took 2.02 s (cap 2 s)",
                                           single_call_ms=2020.0))))
            for reg in (0.0, 1.0):
                bench.append(dict(target="loss", mode="fwd+bwd", provider="recipe", reg_weight=reg, dtype=dt, M=m,
                                  status="skipped", reason="predicted 200.0 s a call from B=256", device=dev,
                                  B=65536, D=512, predicted_s=200.0, probe_B=256, probe_ms=781.0))
    save("bench", status="ok", reason="ok", device=dev, B=65536, D=512, copy_gbps=4100.0,
         backends=["cuda", "triton"], rows=bench)
    ncu = gc.ncu_rows(gc.parse_ncu_csv(NCU_CSV), [{"backend": "cuda", "pass": "fwd"},
                                                  {"backend": "cuda", "pass": "bwd"}], 65536, 4, 512)
    save("ncu", status="ok", reason="2 kernels", device=dev, B=65536, M=4, D=512, dtype="float32", rows=ncu)
    save("pytest", status="ok", reason="200 passed")
    save("bench_cli", status="skipped", reason="not enough time left")

    gc.main(["summarize", "--out", str(out), "--steps", str(steps), "--print"])
    text = capsys.readouterr().out
    assert text == (out / "summary.txt").read_text()
    lines = text.splitlines()
    assert len(lines) <= 60, text
    for needle in ("NVIDIA H200", "bench on NVIDIA H200", "cuda", "triton", "recipe", "skip ~200s", "reg1:tf32",
                   "61.5", "33.2", "2020 once", "reg0:triton",
                   "ERROR cuda random", "illegal memory access", "ncu on NVIDIA H200", "forward_kernel",
                   "cuda-diag", "t-diag", "0.625 (90%)", "SM%", "12.3", "reg1:b-ieee", "reg1:b-bf16", "376",
                   "70.2", "40.5"):
        assert needle in text, needle
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"]["correctness"] == "failed" and summary["status"]["ncu"] == "ok"
    assert json.loads((out / "bench.json").read_text())["direct"] == bench
