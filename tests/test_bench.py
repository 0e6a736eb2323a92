"""Smoke test of `python -m pmrl_kernels.bench`: tiny sizes, every target, mode and provider present here."""
import contextlib
import csv
import dataclasses
import importlib.metadata
import io
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch

from pmrl_kernels import backends, terms
from pmrl_kernels.bench import cli, machine, providers, report, summary, sweep, targets
from pmrl_kernels.bench.cells import MODES

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
    path = tmp_path / "rows.json"
    argv = ["--device", "cpu", "--quick", "--sizes", "B=16;M=3;D=8", "--repeats", "1", "--no-progress", "--no-save",
            "--targets", "align,contrastive", "--modes", "full", "--time-limit", "60", "--json", str(path)]
    assert cli.main(argv) == 0
    rows = json.loads(path.read_text())
    assert [(r["provider"], r["state"]) for r in rows if r["state"] != "ok"] == []
    assert {r["provider"] for r in rows if r["target"] == "align"} == set(providers.BASE_PROVIDERS) | set(here)
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
        torch=providers.spectral(providers.torch_spectrum, _lead_head),
        backend=lambda name, ops: lambda zs: (ops["gram_eig"](zs, True)[2],),
        baselines={"svd": providers.spectral(providers.svd_spectrum, _lead_head)},
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


def _row(target, provider, b, state="ok", ms=None):
    return {"target": target, "mode": "full", "provider": provider, "dtype": "float32", "B": b, "M": 4, "D": 64,
            "state": state, "median_ms": ms}


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
    assert "1.3x slower than the best torch composition (B=1024, cpp)" in text  # cpp, the faster backend at 1024
    assert "the alignment term: 2.0x faster than the published recipe (B=256, reference)" in text
    assert "the best torch composition was not measured" in text
    assert "gram_svd: the published recipe was not measured" in text
    assert "about as fast as the best torch composition (B=256, cpp)" in text  # within 5%
    no_backend = [r for r in rows if r["provider"] not in ("cpp", "reference")]
    assert "no backend of this package ran" in summary.headline(no_backend)


def test_every_note_is_a_sentence(tmp_path):
    path = tmp_path / "rows.json"
    argv = TINY + ["--targets", "align", "--providers", "recipe,torch", "--json", str(path)]
    notes = []
    for extra in (["--mem-budget", "1e-9"], ["--time-limit", "1e-9", "--modes", "forward"]):
        assert cli.main(argv + extra) == 0
        notes += [r["note"] for r in json.loads(path.read_text())]
    assert notes and all(n[0].isupper() and n.endswith(".") and "-skip" not in n for n in notes), notes


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
