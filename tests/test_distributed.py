"""PMRLLoss(gather_with_grad=True) against the single-process loss on the concatenated batch.

Two gloo ranks on 127.0.0.1 (CPU), unequal batches (3 and 5 rows), float64, reference backend. Each rank runs
this file as a script (`--worker`) and saves its losses and gradients; the test compares them with the
single-process values: mean over ranks of the loss == single-process loss, gradient on each rank's rows ==
world_size * single-process gradient ("mean" and "sum"); "none" rows == the single-process rows. Also: an
explicit process_group reaches the gather (a group of both ranks gives the same, a group of one rank the loss
of its own batch), tensor temperatures and the learned tau_reg get the single-process gradient on average over
the ranks (DDP's average), the default PMRLLoss computes on the local batch, and a modality mask and labels
(gathered, so global) give the single-process masked loss.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pmrl_kernels import PMRLLoss, available_backends, distributed

WORLD = 2
SIZES = (3, 5)
M, D = 3, 16
GATHERS = {"functional": distributed._functional_all_gather, "torch.distributed.nn": None}
CONFIGS = [(reduction, reg_weight) for reduction in ("mean", "sum", "none") for reg_weight in (1.0, 0.0)]
# the gather only touches lead, so every backend must give the same semantics (checked in float32)
KERNEL_BACKENDS = [b for b in available_backends() if b != "reference"]
# "none" is reduced by a fixed weighting so its gradient exercises the gather's backward too
NONE_WEIGHTS_SEED = 7
TEMPERATURES = {"tau": 0.05, "tau_reg": 0.1}
LOSS_PARTS = ("loss", "align", "reg")  # the diagnostics are each rank's own batch's
# rank 0 holds rows 0-2, rank 1 rows 3-7: an instance with nothing present and one with one view on each rank,
# and labels shared across the ranks (0 and 6, 2 and 3) and within a rank (4 and 7)
PRESENT = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 0], [1, 1, 0], [1, 1, 1]],
                       dtype=torch.bool)
LABELS = torch.tensor([1, 0, 2, 2, 3, 4, 1, 3])


def full_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(sum(SIZES), M, D, generator=g, dtype=torch.float64)


def none_weights() -> torch.Tensor:
    g = torch.Generator().manual_seed(NONE_WEIGHTS_SEED)
    return torch.rand(sum(SIZES), generator=g, dtype=torch.float64) + 0.5


def run_loss(z: torch.Tensor, rows: slice, reduction: str, reg_weight: float, gather: bool, backend="reference",
             masked=False, **kwargs):
    """(loss parts, gradient on z[rows]) of the loss on z[rows]; "none" is differentiated through a weighted
    sum, with the weights of those rows. masked: with the rows of PRESENT and LABELS. kwargs go to PMRLLoss."""
    x = z[rows].clone().requires_grad_(True)
    fn = PMRLLoss(reduction=reduction, reg_weight=reg_weight, backend=backend, gather_with_grad=gather, **kwargs)
    parts = fn(x, present=PRESENT[rows], labels=LABELS[rows], output_dict=True) if masked else fn(x, output_dict=True)
    scalar = (parts["loss"] * none_weights()[rows].to(x.dtype)).sum() if reduction == "none" else parts["loss"]
    scalar.backward()
    return {k: v.detach() for k, v in parts.items()}, x.grad


def temperature_grads(z: torch.Tensor, rows: slice, gather: bool, backend="reference", group=None,
                      reduction="mean"):
    """(loss, {"tau", "tau_reg": gradient}, gradient on z[rows]) with the temperatures as tensors; "none" is
    differentiated through the sum of its rows."""
    x = z[rows].clone().requires_grad_(True)
    temps = {k: torch.tensor(v, dtype=z.dtype, requires_grad=True) for k, v in TEMPERATURES.items()}
    loss = PMRLLoss(**temps, backend=backend, reduction=reduction, gather_with_grad=gather, process_group=group)(x)
    loss = loss.sum() if reduction == "none" else loss
    loss.backward()
    return loss.detach(), {k: t.grad for k, t in temps.items()}, x.grad


def learned_grad(z: torch.Tensor, rows: slice, group=None) -> torch.Tensor:
    """d logit_scale of PMRLLoss(learn_tau_reg=True); with a group, the module is DDP-wrapped over it, so the
    gradient is averaged over its ranks."""
    fn = PMRLLoss(learn_tau_reg=True, gather_with_grad=group is not None, process_group=group).double()
    model = fn if group is None else DistributedDataParallel(fn, process_group=group)  # alive until the backward
    model(z[rows]).backward()
    return fn.logit_scale.grad


def worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        start = sum(SIZES[:rank])
        rows = slice(start, start + SIZES[rank])
        results = {}
        for impl, fn in GATHERS.items():
            distributed._functional_all_gather = fn  # None selects the torch.distributed.nn fallback
            results.update({(impl, *cfg): run_loss(full_batch(), rows, *cfg, gather=True) for cfg in CONFIGS})
        for backend in KERNEL_BACKENDS:
            results[backend] = run_loss(full_batch().float(), rows, "mean", 1.0, gather=True, backend=backend)
            results["masked", backend] = run_loss(full_batch().float(), rows, "mean", 1.0, gather=True,
                                                  backend=backend, masked=True)
        for reduction in ("mean", "sum", "none"):
            results["masked", reduction] = run_loss(full_batch(), rows, reduction, 1.0, gather=True, masked=True)
        # torch.distributed.nn's backward on gloo takes group ranks for global ones (torch 2.13), which a group
        # of rank 1 alone exposes: the group runs use the functional collectives
        distributed._functional_all_gather = GATHERS["functional"]
        # new_group is collective over every rank, so every rank creates every group, in one order
        pair = dist.new_group(list(range(WORLD)))
        alone = [dist.new_group([r]) for r in range(WORLD)][rank]
        try:
            PMRLLoss(process_group=pair)
        except ValueError as error:
            results["group without gather"] = str(error)
        results["pair"] = run_loss(full_batch(), rows, "mean", 1.0, gather=True, process_group=pair)
        results["alone"] = run_loss(full_batch(), rows, "mean", 1.0, gather=True, process_group=alone)
        results["default"] = run_loss(full_batch(), rows, "mean", 1.0, gather=False)
        for backend in available_backends("cpu"):
            z = full_batch() if backend == "reference" else full_batch().float()
            results["temperatures", backend] = temperature_grads(z, rows, gather=True, backend=backend, group=pair)
        results["temperatures", "none"] = temperature_grads(full_batch(), rows, gather=True, group=pair,
                                                            reduction="none")
        results["learned"] = learned_grad(full_batch(), rows, pair)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("dist")
    port = free_port()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    procs = [
        subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(port), str(out_dir)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(WORLD)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate()[0])
    finally:
        for p in procs:
            p.kill()  # no-op for a process that has exited; never leave a rank waiting on a dead peer
    for r, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"rank {r} failed:\n{out}"
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("impl", GATHERS)
@pytest.mark.parametrize("reduction,reg_weight", CONFIGS)
def test_matches_single_process(rank_results, impl, reduction, reg_weight):
    cfg = (impl, reduction, reg_weight)
    single_parts, single_grad = run_loss(full_batch(), slice(None), reduction, reg_weight, gather=False)
    for name in LOSS_PARTS:
        single = single_parts[name]
        per_rank = [res[cfg][0][name] for res in rank_results]
        if reduction == "none":
            torch.testing.assert_close(torch.cat(per_rank), single, rtol=1e-12, atol=1e-12, msg=name)
        else:
            torch.testing.assert_close(torch.stack(per_rank).mean(), single, rtol=1e-12, atol=1e-12, msg=name)
    # the gather's backward sums every rank's loss gradient; "none" is differentiated via the summed weighting
    scale = 1 if reduction == "none" else WORLD
    grads = torch.cat([res[cfg][1] for res in rank_results])
    torch.testing.assert_close(grads, scale * single_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_backends(rank_results, backend):
    single_loss, single_grad = run_loss(full_batch().float(), slice(None), "mean", 1.0, gather=False, backend=backend)
    loss = torch.stack([res[backend][0]["loss"] for res in rank_results]).mean()
    torch.testing.assert_close(loss, single_loss["loss"], rtol=1e-5, atol=1e-6)
    grads = torch.cat([res[backend][1] for res in rank_results])
    torch.testing.assert_close(grads, WORLD * single_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_masked_and_labelled_batch_matches_single_process(rank_results, reduction):
    """present and labels are gathered: every rank's empty instances are no negatives and are left out of the
    global mean, every rank's same-label instances are no negatives; the diagnostics are the rank's own."""
    single_parts, single_grad = run_loss(full_batch(), slice(None), reduction, 1.0, gather=False, masked=True)
    for name in LOSS_PARTS:
        per_rank = [res["masked", reduction][0][name] for res in rank_results]
        got = torch.cat(per_rank) if reduction == "none" else torch.stack(per_rank).mean()
        torch.testing.assert_close(got, single_parts[name], rtol=1e-12, atol=1e-12, msg=name)
    scale = 1 if reduction == "none" else WORLD
    grads = torch.cat([res["masked", reduction][1] for res in rank_results])
    torch.testing.assert_close(grads, scale * single_grad, rtol=1e-10, atol=1e-12)
    assert (grads[~PRESENT] == 0).all()
    for r, res in enumerate(rank_results):
        start = sum(SIZES[:r])
        local_parts, _ = run_loss(full_batch(), slice(start, start + SIZES[r]), reduction, 1.0, gather=False,
                                  masked=True)
        for name in ("sigma1", "against_lead", "pairwise_cos"):
            torch.testing.assert_close(res["masked", reduction][0][name], local_parts[name], rtol=0, atol=0)
    labelled = PMRLLoss(reduction="none")(full_batch(), present=PRESENT, labels=LABELS)
    unlabelled = PMRLLoss(reduction="none")(full_batch(), present=PRESENT)
    assert labelled[6] < unlabelled[6]  # row 6's label-mate, on the other rank, is a negative without labels


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_masked_kernel_backends(rank_results, backend):
    single, single_grad = run_loss(full_batch().float(), slice(None), "mean", 1.0, gather=False, backend=backend,
                                   masked=True)
    loss = torch.stack([res["masked", backend][0]["loss"] for res in rank_results]).mean()
    torch.testing.assert_close(loss, single["loss"], rtol=1e-5, atol=1e-6)
    grads = torch.cat([res["masked", backend][1] for res in rank_results])
    torch.testing.assert_close(grads, WORLD * single_grad, rtol=1e-4, atol=1e-6)


def test_process_group_reaches_the_gather(rank_results):
    """A group of both ranks gives the default group's result; a group of one rank gathers only its own rows,
    so each rank gets the loss of its own batch (the gather would add the other rank's otherwise)."""
    for res in rank_results:
        for a, b in zip(res["pair"], res[("functional", "mean", 1.0)]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for r, res in enumerate(rank_results):
        start = sum(SIZES[:r])
        local_parts, local_grad = run_loss(full_batch(), slice(start, start + SIZES[r]), "mean", 1.0, gather=False)
        torch.testing.assert_close(res["alone"][0], local_parts, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(res["alone"][1], local_grad, rtol=1e-12, atol=1e-12)
        assert "pass it with gather_with_grad=True" in res["group without gather"]


def test_default_computes_on_the_local_batch(rank_results):
    """PMRLLoss() under an initialised process group: both terms on each rank's own batch, as the published
    code computes them, not on the global batch."""
    global_parts, _ = run_loss(full_batch(), slice(None), "mean", 1.0, gather=False)
    for r, res in enumerate(rank_results):
        start = sum(SIZES[:r])
        local_parts, local_grad = run_loss(full_batch(), slice(start, start + SIZES[r]), "mean", 1.0, gather=False)
        torch.testing.assert_close(res["default"][0], local_parts, rtol=0, atol=0)
        torch.testing.assert_close(res["default"][1], local_grad, rtol=0, atol=0)
    assert not torch.isclose(torch.stack([res["default"][0]["reg"] for res in rank_results]).mean(),
                             global_parts["reg"])


@pytest.mark.parametrize("backend", available_backends("cpu"))
def test_temperature_gradients_through_the_gather(rank_results, backend):
    """Tensor temperatures: each rank's gradient is its share, their mean (DDP's average) the single-process
    gradient; the embeddings' gradients scale as without them. float64 for the reference, float32 otherwise."""
    z = full_batch() if backend == "reference" else full_batch().float()
    tol = dict(rtol=1e-10, atol=1e-12) if backend == "reference" else dict(rtol=1e-4, atol=1e-6)
    single_loss, single_temps, single_grad = temperature_grads(z, slice(None), gather=False, backend=backend)
    per_rank = [res["temperatures", backend] for res in rank_results]
    torch.testing.assert_close(torch.stack([loss for loss, _, _ in per_rank]).mean(), single_loss, **tol)
    for name, single in single_temps.items():
        torch.testing.assert_close(torch.stack([temps[name] for _, temps, _ in per_rank]).mean(), single, **tol,
                                   msg=name)
    torch.testing.assert_close(torch.cat([grad for _, _, grad in per_rank]), WORLD * single_grad, **tol)


def test_temperature_gradients_of_unreduced_rows_add_up(rank_results):
    """With reduction="none" each rank returns its rows of the single-process output, so the temperature gradients
    of the ranks' summed rows add up (not average) to the single-process gradient of the summed rows."""
    single_loss, single_temps, _ = temperature_grads(full_batch(), slice(None), gather=False, reduction="none")
    per_rank = [res["temperatures", "none"] for res in rank_results]
    torch.testing.assert_close(torch.stack([loss for loss, _, _ in per_rank]).sum(), single_loss, rtol=1e-12,
                               atol=1e-12)
    for name, single in single_temps.items():
        torch.testing.assert_close(torch.stack([temps[name] for _, temps, _ in per_rank]).sum(), single,
                                   rtol=1e-10, atol=1e-12, msg=name)
        assert not torch.allclose(torch.stack([temps[name] for _, temps, _ in per_rank]).mean(), single), name


def test_learned_tau_reg_under_ddp(rank_results):
    """PMRLLoss(learn_tau_reg=True, gather_with_grad=True) wrapped in DDP: every rank holds the single-process
    gradient of logit_scale."""
    single = learned_grad(full_batch(), slice(None))
    for res in rank_results:
        torch.testing.assert_close(res["learned"], single, rtol=1e-10, atol=1e-12)


def test_requires_process_group():
    assert not dist.is_initialized()
    loss_fn = PMRLLoss(gather_with_grad=True)  # construction is fine: the group may be initialised later
    with pytest.raises(RuntimeError, match="init_process_group"):
        loss_fn(torch.randn(4, 3, 8))


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
