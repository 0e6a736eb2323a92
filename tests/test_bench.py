"""Smoke test of `python -m pmrl_kernels.bench`: tiny sizes, every target, mode and provider present here."""
import contextlib
import csv
import dataclasses
import importlib.metadata
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from pmrl_kernels import backends, gram_svd, pmrl_loss, terms
from pmrl_kernels.bench import baseline_code, cli, machine, providers, report, summary, sweep, targets
from pmrl_kernels.bench.cells import MODES, matmul_precision
from pmrl_kernels.config import DEFAULTS

from conftest import assert_close

TINY = ["--device", "cpu", "--quick", "--sizes", "B=16,32;M=3;D=8", "--repeats", "2", "--no-progress", "--no-save"]
BASE = ["--providers", "recipe,svd,svdvals,torch,reference"]  # kernel backends: one cell each, below


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The rows of one tiny run, read back from its JSON and CSV, and what it printed."""
    out = tmp_path_factory.mktemp("bench")
    paths = {"json": out / "rows.json", "csv": out / "rows.csv"}
    printed = io.StringIO()  # capsys is function-scoped: capture by hand for this module-scoped run
    with contextlib.redirect_stdout(printed):
        assert cli.main(TINY + BASE + ["--json", str(paths["json"]), "--csv", str(paths["csv"])]) == 0
    rows = json.loads(paths["json"].read_text())
    with open(paths["csv"], newline="") as f:
        csv_rows = list(csv.DictReader(f))
    return rows, csv_rows, printed.getvalue(), paths


def test_every_cell_runs_and_is_well_formed(run):
    rows, _, _, _ = run
    assert {r["target"] for r in rows} == set(targets.TARGETS)
    assert {r["mode"] for r in rows} == set(MODES)
    assert {"recipe", "svd", "svdvals", "torch", "reference"} <= {r["provider"] for r in rows}
    assert {(r["B"], r["M"], r["D"], r["dtype"]) for r in rows} == {(16, 3, 8, "float32"), (32, 3, 8, "float32")}
    bad = [(r["target"], r["mode"], r["provider"], r["state"], r["note"]) for r in rows if r["state"] != "ok"]
    assert not bad
    for r in rows:
        assert list(r) == list(report.FIELDS)
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["peak_mem_mb"] >= 0 and r["gbps"] > 0 and r["copy_gbps"] > 0
        assert r["speedup_vs_torch"] > 0
        assert r["torch"] == torch.__version__ and r["device"] and r["device_type"] == "cpu"
        if r["provider"] in ("recipe", "torch") and r["target"] != "contrastive":
            assert r[f"speedup_vs_{r['provider']}"] == 1.0


def test_csv_matches_json_and_table_is_printed(run):
    rows, csv_rows, printed, _ = run
    assert [r["provider"] for r in csv_rows] == [r["provider"] for r in rows]
    assert list(csv_rows[0]) == list(report.FIELDS)
    assert float(csv_rows[0]["median_ms"]) == pytest.approx(rows[0]["median_ms"])
    assert "float32  B=16  M=3  D=8" in printed and "x recipe" in printed


def test_load_and_plot(run, tmp_path):
    pytest.importorskip("matplotlib")
    *_, paths = run
    png = tmp_path / "plot.png"
    assert cli.main(["--load", str(paths["json"]), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_kernel_backend_is_picked_up(tmp_path):
    """Each backend available here runs through the bench, on the targets whose ops it implements (Triton under
    its interpreter is slow: one cell)."""
    here = backends.implementations("gram_eig", "cpu")
    eager = ["recipe", "svd", "svdvals", "torch"]
    path = tmp_path / "rows.json"
    argv = ["--device", "cpu", "--quick", "--sizes", "B=16;M=3;D=8", "--repeats", "1", "--no-progress", "--no-save",
            "--targets", "align,contrastive", "--modes", "full", "--time-limit", "1e9", "--json", str(path),
            "--providers", ",".join(eager + backends.available_backends("cpu"))]
    assert cli.main(argv) == 0
    rows = json.loads(path.read_text())
    assert [(r["provider"], r["state"]) for r in rows if r["state"] != "ok"] == []
    assert {r["provider"] for r in rows if r["target"] == "align"} == set(eager) | set(here)
    own = {n for n, f in backends.implementations("contrastive", "cpu").items() if f is not terms.contrastive}
    assert {r["provider"] for r in rows if r["target"] == "contrastive"} == {"torch"} | own


def test_skips_are_cell_states_and_the_run_goes_on(tmp_path):
    path = tmp_path / "rows.json"
    argv = TINY + ["--targets", "align", "--providers", "recipe,torch", "--json", str(path)]
    assert cli.main(argv + ["--mem-budget", "1e-9"]) == 0
    assert {r["state"] for r in json.loads(path.read_text())} == {"OOM-skip"}
    assert cli.main(argv + ["--time-limit", "1e-9", "--modes", "forward"]) == 0
    states = {(r["B"], r["state"]) for r in json.loads(path.read_text())}
    assert states == {(16, "timeout"), (32, "timeout-skip")}


@pytest.mark.parametrize("error, states", [
    (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1 GB"), ["OOM", "OOM-skip"]),
    (ValueError("broken provider"), ["error", "error"]),
])
def test_a_failing_provider_is_a_cell_state(monkeypatch, tmp_path, error, states):
    def fail(zs):
        raise error

    align = targets.TARGETS["align"]
    broken = dataclasses.replace(align, baselines={**align.baselines, "svd": fail})
    monkeypatch.setitem(targets.TARGETS, "align", broken)
    path = tmp_path / "rows.json"
    argv = TINY + ["--targets", "align", "--modes", "forward", "--providers", "svd,torch", "--json", str(path)]
    assert cli.main(argv) == 0
    rows = json.loads(path.read_text())
    assert [r["state"] for r in rows if r["provider"] == "svd"] == states
    assert all(r["state"] == "ok" for r in rows if r["provider"] == "torch")


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "B=0"], "must be >= 1"),
    (["--sizes", "X=3"], "KEY=N"),
    (["--sizes", "M=1"], "must be >= 2"),
    (["--sizes", "B=ten"], "integers"),
    (["--providers", "nope"], "unknown ['nope']"),
    (["--targets", "loss,foo"], "unknown ['foo']"),
    (["--modes", ""], "choose from"),
    (["--dtype", "int8"], "unknown ['int8']"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--time-limit", "-1"], "must be > 0"),
    (["--load", "/nonexistent/rows.json"], "cannot read"),
    (["--out", __file__], "is not a folder"),
    (["--quick", "--full"], "exclude each other"),
    (["--targets", "contrastive", "--providers", "svdvals"], "no provider computes"),
    pytest.param(["--providers", "cuda"], "not available on cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present")),
])
def test_bad_flags_fail_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--no-progress"] + argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_module_entry_point():
    root = Path(cli.__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "pmrl_kernels.bench", "--help"], cwd=root, capture_output=True,
                          text=True)
    assert done.returncode == 0 and "--sizes" in done.stdout


def _lead_head(s, lead):
    return (lead,)


def test_a_new_target_is_one_record_in_the_table(monkeypatch, tmp_path):
    """A target registered as one record (here: the lead direction alone) is swept, sized, run and reported."""
    record = targets.Target(
        "lead_dir", takes="z", batch_power=1, ops=("gram_eig",),
        io_bytes=lambda case: (case.B * case.M * case.D * 4, case.B * case.D * 4),
        working_bytes=lambda case, logits: 4 * case.B * case.M * case.D * 4,
        torch=baseline_code.spectral(baseline_code.torch_spectrum, _lead_head),
        backend=lambda name, ops: lambda zs: (ops["gram_eig"](zs, True)[2],),
        baselines={"svd": baseline_code.spectral(baseline_code.svd_spectrum, _lead_head)},
    )
    monkeypatch.setitem(targets.TARGETS, record.name, record)
    names = ["recipe", "svd", "svdvals", "torch", "reference"]
    cases = sweep.build_cases([("float32", 16, 3, 8)], ["lead_dir"], ["full"], names, "cpu")
    assert [(c.target, c.provider) for c in cases] == [("lead_dir", p) for p in ("svd", "torch", "reference")]
    assert "lead_dir" in cli._parser().parse_args([]).targets.split(",")

    path = tmp_path / "rows.json"
    argv = ["--device", "cpu", "--quick", "--sizes", "B=16;M=3;D=8", "--repeats", "1", "--no-progress", "--no-save",
            "--targets", "lead_dir", "--modes", "full", "--providers", ",".join(names), "--json", str(path)]
    assert cli.main(argv) == 0
    rows = json.loads(path.read_text())
    assert [(r["target"], r["provider"], r["state"]) for r in rows] == [
        ("lead_dir", p, "ok") for p in ("svd", "torch", "reference")]
    assert all(r["floor_bytes"] == 3 * 16 * 3 * 8 * 4 + 2 * 16 * 8 * 4 and r["speedup_vs_torch"] > 0 for r in rows)
    assert all(r["speedup_vs_recipe"] is None for r in rows)
    assert cli.main(argv + ["--mem-budget", "1e-9"]) == 0  # its byte model decides the memory skip
    assert {r["state"] for r in json.loads(path.read_text())} == {"OOM-skip"}


def test_default_run_saves_every_file_in_a_folder_it_names(monkeypatch, tmp_path, capsys):
    """Without --no-save a run writes rows.json, rows.csv, plot.png and report.txt into a new folder named after
    the device and the time, and says where; report.txt is what it printed."""
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    argv = ["--device", "cpu", "--quick", "--sizes", "B=16,32;M=3;D=8", "--repeats", "1", "--no-progress",
            "--targets", "align", "--modes", "full", "--providers", "torch,reference"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    (folder,) = (tmp_path / cli.RESULTS_ROOT).iterdir()
    assert folder.name.startswith(re.sub(r"[^a-z0-9]+", "-", machine.device_name(torch.device("cpu")).lower())
                                  .strip("-"))
    assert sorted(p.name for p in folder.iterdir()) == sorted(cli.FILES.values())
    assert f"into {Path(cli.RESULTS_ROOT) / folder.name}{os.sep}." in printed
    rows = json.loads((folder / "rows.json").read_text())
    assert len(rows) == 4 and all(r["state"] == "ok" for r in rows)
    assert (folder / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report_text = (folder / "report.txt").read_text()
    assert report_text.strip() in printed and "Headline:" in report_text and "Providers:" in report_text


def test_results_folder_name():
    when = time.strptime("2026-11-30 14:15:02", "%Y-%m-%d %H:%M:%S")
    assert cli.results_folder("AMD EPYC 7B13 (2 CPUs)", when) == Path(
        cli.RESULTS_ROOT, "amd-epyc-7b13-2-cpus-20261130-141502")


def test_legend_explains_every_provider_and_column(run):
    rows, _, printed, _ = run
    text = summary.legend(sorted({r["provider"] for r in rows}))
    for provider in {r["provider"] for r in rows}:
        assert re.search(rf"^  {provider} +\S", text, re.M), provider
    header = next(line for line in report.table(rows).splitlines() if line.startswith("target"))
    for column in ("median ms", "p20-p80 ms", "peak MB", "x recipe", "x svd", "x torch", "GB/s", "%copy", "state"):
        assert column in header and column in text, column
    assert text in printed


def _row(target, provider, b, state="ok", ms=None, spread=1.1, auto=None):
    return {"target": target, "mode": "full", "provider": provider, "precision": "highest", "dtype": "float32",
            "B": b, "M": 4, "D": 64, "state": state, "median_ms": ms,
            "p20_ms": None if ms is None else ms / spread ** 0.5, "p80_ms": None if ms is None else ms * spread ** 0.5,
            "auto": provider in ("cpp", "reference") if auto is None else auto, "loaded": False, "load_avg": 0.1}


def test_headline_reads_the_largest_size_where_both_ran():
    rows = [
        _row("loss", "cpp", 256, ms=2.0), _row("loss", "recipe", 256, ms=10.0),
        _row("loss", "cpp", 1024, ms=4.0), _row("loss", "recipe", 1024, "timeout"),
        _row("loss", "svd", 256, "timeout"), _row("loss", "svd", 1024, "timeout-skip"),
        _row("loss", "torch", 256, ms=1.0), _row("loss", "torch", 1024, ms=3.0),
        _row("loss", "reference", 1024, ms=6.0),
        _row("align", "reference", 256, ms=8.0), _row("align", "recipe", 256, ms=16.0),
        _row("gram_svd", "cpp", 256, ms=1.0), _row("gram_svd", "torch", 256, ms=1.02),
    ]
    text = " ".join(summary.headline(rows).split())  # unwrapped
    assert "float32, M=4, D=64" in text
    assert "the whole loss: 5.0x faster than the published recipe (B=256, cpp)" in text
    assert "torch.linalg.svd did not finish a call within the time limit at any size" in text
    assert "1.3x slower than the torch composition (B=1024, cpp)" in text  # cpp, the faster backend at 1024
    assert "the alignment term: 2.0x faster than the published recipe (B=256, reference)" in text
    assert "the torch composition was not measured" in text
    assert "gram_svd: the published recipe was not measured" in text
    assert "about as fast as the torch composition (B=256, cpp)" in text  # within 5%
    no_backend = [r for r in rows if r["provider"] not in ("cpp", "reference")]
    assert "nothing to compare" in summary.headline(no_backend)


def test_headline_quotes_only_tight_cells_of_the_backend_auto_picks():
    """A cell with p80/p20 >= 1.5 is not quoted (the next smaller B is), a backend "auto" does not pick is never
    quoted however fast, and a loaded machine gets no headline."""
    rows = [
        _row("loss", "cpp", 256, ms=2.0), _row("loss", "torch", 256, ms=4.0),
        _row("loss", "cpp", 1024, ms=8.0, spread=1.6), _row("loss", "torch", 1024, ms=80.0),
        _row("loss", "blocked", 1024, ms=0.01), _row("loss", "blocked", 256, ms=0.01),
    ]
    text = " ".join(summary.headline(rows).split())
    assert "the whole loss:" in text and "2.0x faster than the torch composition (B=256, cpp)" in text
    assert "blocked" not in text and "10.0x" not in text
    wide = [_row("loss", "cpp", 256, ms=2.0, spread=2.0), _row("loss", "torch", 256, ms=4.0)]
    assert "no size had both cells' p80/p20 under 1.5" in " ".join(summary.headline(wide).split())
    loaded = [dict(r, loaded=True, load_avg=7.9) for r in rows]
    text = " ".join(summary.headline(loaded).split())
    assert "Headline: none" in text and "7.9" in text and "unreliable" in text and "faster" not in text


def test_table_columns_never_run_together():
    row = _row("contrastive", "reference", 16384, ms=12345.678, auto=False)
    row.update(note=None, p20_ms=10430.0, p80_ms=14610.0, peak_mem_mb=0.5, speedup_vs_recipe=5369.84,
               speedup_vs_svd=None, speedup_vs_torch=0.004, gbps=0.000382, copy_fraction=1e-6, calls=3)
    head, line = report.table([row, dict(row, provider="cpp", auto=True)]).splitlines()[4:6]
    assert line.split() == ["contrastive", "full", "highest", "reference", "1.235e+04", "1.043e+04-1.461e+04",
                            "0.5", "5369.84", "-", "0.00", "0.000382", "0", "ok"]
    assert [head.index(c) + len(c) for c in ("median ms", "x recipe", "GB/s")] == [
        line.index(v) + len(v) for v in ("1.235e+04", "5369.84", "0.000382")]  # right-aligned under the header


def test_header_names_the_commit_or_the_installed_version():
    row = dict(_row("loss", "cpp", 16, ms=1.0), note=None, peak_mem_mb=1.0, speedup_vs_recipe=None,
               speedup_vs_svd=None, speedup_vs_torch=None, gbps=None, copy_fraction=None)
    assert "commit abc123-dirty)" in report.table([dict(row, commit="abc123-dirty", version="0.1.0")])
    assert "pmrl_kernels 0.1.0)" in report.table([dict(row, commit=None, version="0.1.0")])
    commit = machine.git_commit()  # this test file sits in a checkout or an unpacked source tree
    top = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    assert commit is None or commit.split("-")[0] == top.stdout.strip()


def test_every_note_is_a_sentence(tmp_path):
    path = tmp_path / "rows.json"
    argv = TINY + ["--targets", "align", "--providers", "recipe,torch", "--json", str(path)]
    notes = []
    for extra in (["--mem-budget", "1e-9"], ["--time-limit", "1e-9", "--modes", "forward"]):
        assert cli.main(argv + extra) == 0
        notes += [r["note"] for r in json.loads(path.read_text())]
    assert notes and all(n[0].isupper() and n.endswith(".") and "-skip" not in n for n in notes), notes


COMMITTED_ROWS = sorted((Path(__file__).parents[1] / "benchmarks" / "results").glob("*/rows.json"))


@pytest.mark.parametrize("rows_json", COMMITTED_ROWS, ids=lambda p: p.parent.name)
def test_committed_results_load(rows_json, capsys):
    """Every committed run's rows print again, those of an older bench with the fields it lacks as None."""
    assert cli.main(["--load", str(rows_json)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(rows_json.read_text())
    assert f"B={rows[0]['B']}" in printed and rows[0]["provider"] in printed and "Headline:" in printed


def test_loading_a_run_without_rows(tmp_path, capsys):
    empty = tmp_path / "rows.json"
    empty.write_text("[]")
    assert cli.main(["--load", str(empty)]) == 0
    assert "nothing to compare" in capsys.readouterr().out


def test_every_option_has_help():
    for action in cli._parser()._actions:
        assert action.help and len(action.help) > 10, action.option_strings


def test_console_entry_point_is_the_module_main():
    """pyproject declares `pmrl-bench` as pmrl_kernels.bench.cli:main; a pip install declares it in its metadata and
    puts a script that runs it in its scripts folder."""
    text = (Path(cli.__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert re.search(r'^pmrl-bench = "pmrl_kernels\.bench\.cli:main"$', text, re.M)
    try:
        installed = importlib.metadata.distribution("pmrl_kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pmrl_kernels is not installed with pip here, so there is no console script to run")
    (entry,) = [e for e in installed.entry_points if (e.group, e.name) == ("console_scripts", "pmrl-bench")]
    assert entry.load() is cli.main
    script = Path(sysconfig.get_path("scripts")) / "pmrl-bench"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "usage: pmrl-bench" in done.stdout


def test_an_interrupted_run_writes_the_cells_it_measured(monkeypatch, tmp_path):
    """SIGINT (gpu_run.sh's timeout sends it first) ends the sweep; the rows so far are written and the exit status
    says the run was cut."""
    calls = []
    real = sweep.measure

    def measure_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep, "measure", measure_then_interrupt)
    path = tmp_path / "rows.json"
    argv = TINY + ["--targets", "align", "--modes", "forward", "--providers", "svd,torch", "--json", str(path)]
    assert cli.main(argv) == cli.INTERRUPTED
    rows = json.loads(path.read_text())
    assert [(r["provider"], r["B"], r["state"]) for r in rows] == [("svd", 16, "ok"), ("torch", 16, "ok")]


GPU_RUN = Path(cli.__file__).resolve().parents[2] / "benchmarks" / "gpu_run.sh"
GPU_TOOLS = {"compute-sanitizer", "ncu"}  # shipped with the CUDA toolkit on the GPU machine, absent here


def _gpu_run_steps(out: Path, *flags: str) -> dict[str, list[str]]:
    """{step: its command as argv}, from the script's --dry-run with OUT=out."""
    done = subprocess.run(["bash", str(GPU_RUN), "--dry-run", *flags], capture_output=True, text=True,
                          env={**os.environ, "OUT": str(out)}, cwd=GPU_RUN.parents[1])
    assert done.returncode == 0, done.stderr
    steps = {}
    for line in done.stdout.splitlines():
        name, _, command = line.partition("\t")
        steps[name] = shlex.split(command)
    return steps


def test_gpu_run_script_parses():
    done = subprocess.run(["bash", "-n", str(GPU_RUN)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("flags, names", [
    ((), ["build", "pytest", "bench", "bench_m16", "memcheck", "racecheck", "ncu", "ncu_csv"]),
    (("--cpu-smoke",), ["pytest", "bench"]),
])
def test_gpu_run_steps_name_commands_that_exist(flags, names, tmp_path):
    """Every step's program is on the PATH (the CUDA tools on the GPU machine only), every `python -m` module
    imports, every test file exists and the bench flags parse; --dry-run runs nothing and writes nothing."""
    steps = _gpu_run_steps(tmp_path / "out", *flags)
    assert list(steps) == names
    for name, argv in steps.items():
        while argv[0] == "env" or "=" in argv[0]:  # env VAR=value ... prefixes
            argv = argv[1:]
        programs = [a for a in argv if a in GPU_TOOLS] or [argv[0]]
        for program in programs:
            assert program in GPU_TOOLS or shutil.which(program), (name, program)
        python = argv.index("-m") - 1 if "-m" in argv else None
        if python is not None:
            module = argv[python + 2]
            # looked up in a child process: setuptools' distutils shim turns itself off in a process that looks pip up
            lookup = f"import importlib.util; assert importlib.util.find_spec({module!r})"
            found = subprocess.run([sys.executable, "-c", lookup], capture_output=True)
            assert found.returncode == 0, (name, module)
            if module == "pytest":
                files = [a for a in argv if a.startswith("tests/")]
                assert files and all((GPU_RUN.parents[1] / f).is_file() for f in files), files
            if module == "pmrl_kernels.bench":
                cli._parser().parse_args(argv[python + 3:])
    assert not (tmp_path / "out").exists()


def test_gpu_run_passes_the_subset_through(tmp_path):
    env = {"PMRL_K": "cuda and float32", "PMRL_BENCH_SIZES": "B=4096;M=4;D=512", "PMRL_TESTS": "tests/test_api.py"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        steps = _gpu_run_steps(tmp_path)
    assert steps["pytest"][steps["pytest"].index("-k") + 1] == "cuda and float32"
    assert "tests/test_api.py" in steps["pytest"] and "tests/test_triton.py" not in steps["pytest"]
    assert steps["bench"][steps["bench"].index("--sizes") + 1] == "B=4096;M=4;D=512"


def _baseline_inputs(kind: str, b: int = 16, m: int = 4, d: int = 8, seed: int = 0) -> list[torch.Tensor]:
    """M float32 tensors [B, D]: random, at the rank-1 optimum (every modality the same rows), with a duplicated
    modality, or with D < M."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "d_less_than_m":
        d = m - 2
    zs = [torch.randn(b, d, generator=gen) for _ in range(m)]
    if kind == "rank1":
        zs = [zs[0] * (1 + k) for k in range(m)]
    if kind == "duplicated":
        zs[1] = zs[0].clone()
    return [z.requires_grad_() for z in zs]


def _package_outputs(target: str, z64: list[torch.Tensor]) -> tuple:
    """The package's float64 reference for what `target` computes from these float64 inputs."""
    if target == "loss":
        return (pmrl_loss(z64, backend="reference"),)
    if target == "loss_masked":
        return (pmrl_loss(z64, present=targets.mixed_mask(z64[0].shape[0], len(z64), "cpu"), backend="reference"),)
    if target == "align":
        return (pmrl_loss(z64, reg_weight=0.0, backend="reference"),)
    s, _, lead = gram_svd(z64, backend="reference")
    return s, lead


BASELINE_CELLS = [(t, p) for t, target in targets.TARGETS.items() if t != "contrastive"
                  for p in ["torch", *target.baselines] if p != "compiled"]


@pytest.mark.parametrize("kind", ["random", "rank1", "duplicated", "d_less_than_m"])
@pytest.mark.parametrize("target, provider", BASELINE_CELLS)
def test_every_baseline_computes_the_package_value(monkeypatch, target, provider, kind):
    """Each baseline's outputs equal the package's float64 reference, so no baseline times another computation;
    CHUNK = 5 splits B = 16 into uneven chunks."""
    monkeypatch.setattr(baseline_code, "CHUNK", 5)
    zs = _baseline_inputs(kind)
    record = targets.TARGETS[target]
    forward = record.torch if provider == "torch" else record.baselines[provider]
    got = forward(zs)
    expected = _package_outputs(target, [z.detach().double() for z in zs])
    if target == "gram_svd" and got[0].shape[1] < expected[0].shape[1]:  # an SVD of D < M rows: D values
        k = got[0].shape[1]
        assert_close(expected[0][:, k:], torch.zeros_like(expected[0][:, k:]), atol=1e-12, rtol=0, what="S beyond D")
        expected = (expected[0][:, :k], expected[1])
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        # float32 Gram eigenvalues carry eps * s_1^2 of error, which sqrt makes sqrt(eps) * s_1 on a zero S
        atol = 1e-3 if (target, i) == ("gram_svd", 0) else 2e-4
        assert_close(g, e, atol=atol, rtol=2e-4, what=f"{target} {provider} {kind} output {i}")
    if kind == "random":  # the backward too: elsewhere the torch compositions' gradients may not exist (eigh, sqrt)
        z64 = [z.detach().double().requires_grad_() for z in zs]
        grads = torch.autograd.grad(got[0].sum(), zs)
        expected_grads = torch.autograd.grad(_package_outputs(target, z64)[0].sum(), z64)
        for g, e in zip(grads, expected_grads):
            assert_close(g, e, atol=1e-3, rtol=1e-3, what=f"{target} {provider} gradient")


def test_contrastive_baselines_compute_the_package_value():
    """torch (F.cross_entropy on lead @ lead.T / tau_reg) and the same under torch.compile give the package's
    contrastive term, in every matmul precision the bench sweeps (bfloat16 operands: to bfloat16's precision)."""
    gen = torch.Generator().manual_seed(1)
    lead = torch.nn.functional.normalize(torch.randn(24, 8, generator=gen), dim=-1).requires_grad_()
    expected = terms.contrastive(lead.detach().double(), lead.detach().double(), DEFAULTS.tau_reg).mean()
    record = targets.TARGETS["contrastive"]
    for precision, tol in (("highest", 1e-5), ("tf32", 1e-5), ("bf16", 0.05)):
        with matmul_precision(precision, "cpu"):
            for forward in (record.torch, record.baselines["compiled"]):
                (got,) = forward([lead])
                assert_close(got, expected, atol=tol, rtol=tol, what=f"contrastive {precision}")
    assert torch.get_float32_matmul_precision() == "highest" and not torch.is_autocast_enabled("cpu")


def test_default_cpu_run_is_the_b_sweep_forward_and_backward(monkeypatch):
    """The default CPU run: float32 B = 256, 1024, 4096 at M = 4, D = 256, mode full, IEEE matmuls, and neither the
    interpreted Triton kernels nor torch.compile; --full adds every mode and the side points."""
    seen = {}

    def run(cases, *args, **kwargs):
        seen["cases"] = cases
        return []

    monkeypatch.setattr(cli, "run", run)
    monkeypatch.setattr(cli, "_finish", lambda *args, **kwargs: None)
    cli.main(["--device", "cpu", "--no-progress", "--no-save"])
    cases = seen["cases"]
    assert {(c.dtype, c.B, c.M, c.D) for c in cases} == {("float32", b, 4, 256) for b in (256, 1024, 4096)}
    assert {c.mode for c in cases} == {"full"} and {c.precision for c in cases} == {"highest"}
    assert not {c.provider for c in cases} & {"triton", "compiled"}
    assert {c.target for c in cases} == set(targets.TARGETS)
    cli.main(["--device", "cpu", "--no-progress", "--no-save", "--full"])
    assert {c.mode for c in seen["cases"]} == set(MODES) and len(seen["cases"]) > 3 * len(cases)


def test_a_variant_runs_its_backend_with_its_knob_set_beside_it(monkeypatch, tmp_path):
    """A variant (here: reference with an environment variable set, as cuda-8-lanes sets PMRL_CUDA_MAX_LANES) is
    a provider of the targets its backend computes, sees its environment in every call, forward and backward, and
    leaves the environment as it found it."""
    knob = "PMRL_BENCH_TEST_KNOB"
    monkeypatch.delenv(knob, raising=False)
    variant = providers.Variant("reference", {knob: "8"}, "reference with the test knob")
    monkeypatch.setitem(providers.VARIANTS, "reference-knob", variant)
    seen = []

    class Spy(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen.append(("forward", os.environ.get(knob)))
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            seen.append(("backward", os.environ.get(knob)))
            return grad

    align = targets.TARGETS["align"]
    spied = dataclasses.replace(align, backend=lambda name, ops: lambda zs: (
        Spy.apply(pmrl_loss(zs, reg_weight=0.0, backend=name)),))
    monkeypatch.setitem(targets.TARGETS, "align", spied)
    path = tmp_path / "rows.json"
    argv = TINY + ["--targets", "align", "--modes", "full", "--providers", "reference,reference-knob",
                   "--sizes", "B=16;M=3;D=8", "--json", str(path)]
    assert cli.main(argv) == 0
    rows = json.loads(path.read_text())
    assert [(r["provider"], r["state"], r["auto"]) for r in rows] == [("reference", "ok", False),
                                                                      ("reference-knob", "ok", False)]
    assert {value for _, value in seen} == {None, "8"} and {step for step, _ in seen} == {"forward", "backward"}
    for row, value in zip(rows, (None, "8")):  # forward and backward of the warm-up call and of each timed call
        assert len([v for _, v in seen if v == value]) == 2 * (row["calls"] + 1)
    assert knob not in os.environ
    assert "reference with the test knob" in summary.legend(["reference-knob"])
