"""The blocked contrastive backend (pmrl_kernels/ops/blocked_contrastive.py): its blocks, its work and memory
bound, its precision. The conformance suite (test_conformance.py) runs its op-level checks against the float64
reference with every other contrastive backend."""
import pytest
import torch

from conftest import (
    NEAR_OPTIMUM_MARGINS, check_contrastive, check_contrastive_at_large_logits, check_contrastive_near_optimum,
    check_contrastive_under_autocast, f64,
)
from pmrl_kernels import backends, pmrl_loss, terms
from pmrl_kernels.ops import blocked_contrastive, contrastive_common

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = {"self": (40, 40, 80, True, 0.7, 0), "offset": (40, 70, 80, False, 0.7, 23)}  # as test_conformance's


def test_registered_for_every_device():
    for device in ("cpu", DEVICE):
        assert backends.implementations("contrastive", device)["blocked"] is blocked_contrastive.contrastive
    assert "gram_eig" not in backends.REGISTRY["blocked"].ops  # backend="blocked" takes gram_eig as "auto" does


@pytest.mark.parametrize("rows_a_block", [1, 3, 17, 40])
@pytest.mark.parametrize("case", list(CASES))
def test_every_block_size_matches_the_reference(case, rows_a_block, monkeypatch):
    """Blocks of 1 row, of 3 and 17 (not dividing B = 40: a short last block) and one block: values and
    gradients against float64, rows that are the columns and gathered columns with an offset."""
    b, n = CASES[case][:2]
    monkeypatch.setattr(blocked_contrastive, "BLOCK_ELEMENTS", rows_a_block * n)
    assert blocked_contrastive.block_rows(b, n) == rows_a_block
    check_contrastive(blocked_contrastive.contrastive, DEVICE, *CASES[case])


def _record_products(monkeypatch):
    """(m, k, n, precision argument, TF32 allowed, autocast on) of every product the backend forms."""
    calls = []

    def note(a, b, precision):
        calls.append((a.shape[0], a.shape[1], b.shape[1], precision, contrastive_common._tf32_matmul(a.device.type),
                      torch.is_autocast_enabled(a.device.type)))

    product, add_product = blocked_contrastive._product, blocked_contrastive._add_product
    inside = []  # _add_product's 16-bit path forms its product with _product: noted once

    def recorded_product(a, b, precision):
        if not inside:
            note(a, b, precision)
        return product(a, b, precision)

    def recorded_add_product(out, a, b, precision, first):
        note(a, b, precision)
        inside.append(True)
        try:
            add_product(out, a, b, precision, first)
        finally:
            inside.pop()

    monkeypatch.setattr(blocked_contrastive, "_product", recorded_product)
    monkeypatch.setattr(blocked_contrastive, "_add_product", recorded_add_product)
    return calls


@pytest.mark.parametrize("one_block", [False, True], ids=["blocks_of_7_rows", "one_block"])
@pytest.mark.parametrize("same", [True, False], ids=["rows_are_columns", "gathered_columns"])
def test_gemm_equivalents_and_no_logits_past_a_block(same, one_block, monkeypatch):
    """The docstring's work and memory: with several blocks the products add up to 4 x 2 B N D flops (1 forward,
    3 backward: the logits recomputed, d rows, d cols), with one block to 3 (the forward's Q kept), and no logits
    matrix holds more than BLOCK_ELEMENTS entries."""
    b, n, d = 40, 40 if same else 70, 24
    monkeypatch.setattr(blocked_contrastive, "BLOCK_ELEMENTS", (b if one_block else 7) * n)
    calls = _record_products(monkeypatch)
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(b, d, generator=g, device=DEVICE).requires_grad_()
    cols = rows if same else torch.randn(n, d, generator=g, device=DEVICE).requires_grad_()
    loss = blocked_contrastive.contrastive(rows, cols, 0.5, 0 if same else 11)
    forward = len(calls)
    loss.sum().backward()
    assert sum(2 * m * k * nn for m, k, nn, *_ in calls) == (3 if one_block else 4) * 2 * b * n * d
    logits = [(m, nn) for m, k, nn, *_ in calls if k == d and nn == n]  # rows_blk @ cols^T
    blocks = 1 if one_block else -(-b // 7)  # ceil(B / 7) blocks
    assert forward == blocks and len(logits) == (1 if one_block else 2 * blocks)  # recomputed with several
    assert max(m * nn for m, nn in logits) <= blocked_contrastive.BLOCK_ELEMENTS


@pytest.mark.parametrize("rows_a_block", [7, 40])
@pytest.mark.parametrize("case", list(CASES))
def test_gradients_never_read_their_uninitialised_buffers(case, rows_a_block, monkeypatch):
    """The backward writes each gradient before adding to it (no zero fill): with every new buffer full of NaN,
    values and gradients still match the reference, in one block and in several."""
    b, n = CASES[case][:2]
    monkeypatch.setattr(blocked_contrastive, "BLOCK_ELEMENTS", rows_a_block * n)
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kwargs: empty_like(t, **kwargs).fill_(float("nan")))
    check_contrastive(blocked_contrastive.contrastive, DEVICE, *CASES[case])


@pytest.mark.parametrize("one_block", [True, False], ids=["one_block", "blocks_of_5_rows"])
def test_opcheck(one_block, monkeypatch):
    """The three registered ops pass torch.library.opcheck (schema, fake tensors, autograd registration), with and
    without the masks, with the forward's saved block and without it."""
    monkeypatch.setattr(blocked_contrastive, "BLOCK_ELEMENTS", (12 if one_block else 5) * 20)
    g = torch.Generator().manual_seed(6)
    rows, cols = torch.randn(12, 8, generator=g).to(DEVICE), torch.randn(20, 8, generator=g).to(DEVICE)
    col_labels = torch.randint(0, 4, (20,), generator=g).to(DEVICE)
    col_valid = (torch.rand(20, generator=g) > 0.3).to(DEVICE)
    grad = torch.randn(12, generator=g).to(DEVICE)
    ops = torch.ops.pmrl_kernels
    for masks in ((), (col_labels[3:15], col_labels, col_valid)):
        _, *saved = ops.blocked_contrastive_fwd(rows, cols, 0.5, 3, "ieee", *masks)
        sym_masks = masks and (col_labels[:12], col_labels[:12], col_valid[:12])
        _, *sym_saved = ops.blocked_contrastive_fwd(rows, rows, 0.5, 0, "ieee", *sym_masks)
        for op, args in ((ops.blocked_contrastive_fwd, (rows, cols, 0.5, 3, "ieee", *masks)),
                         (ops.blocked_contrastive_bwd, (rows, cols, *saved, grad, 0.5, 3, "ieee", *masks)),
                         (ops.blocked_contrastive_sym_bwd, (rows, *sym_saved, grad, 0.5, "ieee", *sym_masks))):
            torch.library.opcheck(op, args)


def test_products_run_as_torchs_matmul_would(monkeypatch):
    """IEEE or TF32 as torch's setting is when each product runs (the backend never changes it: as torch's matmul
    and its autograd); 16-bit as the forward was under autocast, also for a backward run outside autocast; autocast
    itself off inside, so a backward run inside an autocast region does not recast (a recast would meet the
    forward's 16-bit operands with a dtype mismatch)."""
    calls = _record_products(monkeypatch)
    rows = torch.randn(8, 16, device=DEVICE).requires_grad_()
    try:
        for setting, tf32 in (("highest", False), ("high", True)):
            torch.set_float32_matmul_precision(setting)
            calls.clear()
            loss = blocked_contrastive.contrastive(rows, rows, 0.5)
            with torch.autocast(DEVICE, dtype=torch.bfloat16):  # the backward inside an autocast region
                loss.sum().backward()
            assert {c[3:] for c in calls} == {("tf32" if tf32 else "ieee", tf32, False)}, (setting, calls)
    finally:
        torch.set_float32_matmul_precision("highest")
    calls.clear()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = blocked_contrastive.contrastive(rows, rows, 0.5)
    loss.sum().backward()  # outside autocast: the forward's 16-bit products again
    assert {c[3] for c in calls} == {"bf16"} and len(calls) == 3 and not any(c[5] for c in calls)


def test_float64_is_computed_in_float64():
    """float64 rows and columns: loss and gradients those of terms.contrastive in float64 to 1e-12 (float32
    anywhere on the way would leave errors of 1e-7)."""
    g = torch.Generator().manual_seed(4)
    rows = torch.randn(30, 20, generator=g, dtype=torch.float64)
    cols = torch.randn(45, 20, generator=g, dtype=torch.float64)
    grad = torch.randn(30, generator=g, dtype=torch.float64)
    results = []
    for fn in (blocked_contrastive.contrastive, terms.contrastive):
        r, c = rows.to(DEVICE).requires_grad_(), cols.to(DEVICE).requires_grad_()
        loss = fn(r, c, 0.3, 7)
        results.append((loss, *torch.autograd.grad(loss, (r, c), grad.to(DEVICE))))
    assert results[0][0].dtype == torch.float64
    for what, got, exact in zip(("loss", "d rows", "d cols"), *results):
        torch.testing.assert_close(got, exact, rtol=1e-12, atol=1e-12, msg=what)


def test_gradient_at_large_logits():
    """Losses of ~1e5 (conftest.check_contrastive_at_large_logits): P taken from a stored loss or logsumexp (an ulp
    of 1e5 is 0.008) would be off by far more than torch's float32 softmax (4e-4 in d rows); P normalised by its
    own sum meets the accuracy rule."""
    check_contrastive_at_large_logits(blocked_contrastive.contrastive, DEVICE)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_matches_torch_autocast(dtype):
    """Under torch.autocast the logits and the backward's products are 16-bit, as torch's matmul gives them: the
    accuracy rule with torch under autocast as the baseline, and the loss torch's own to a hundredth of that
    baseline's error (an fp32 product would sit at the float64 value instead)."""
    check_contrastive_under_autocast(blocked_contrastive.contrastive, DEVICE, dtype)
    g = torch.Generator().manual_seed(5)
    rows, cols = torch.randn(40, 32, generator=g).to(DEVICE), torch.randn(50, 32, generator=g).to(DEVICE)
    with torch.autocast(DEVICE, dtype=dtype):
        got = blocked_contrastive.contrastive(rows, cols, 0.5, 10)
        base = terms.contrastive(rows, cols, 0.5, 10)  # the same matmul, on the same device
    exact = terms.contrastive(f64(rows), f64(cols), 0.5, 10)
    assert (f64(got) - f64(base)).abs().max() <= 0.01 * (f64(base) - exact).abs().max()


@pytest.mark.parametrize("margin", NEAR_OPTIMUM_MARGINS)
def test_loss_keeps_relative_precision_near_the_optimum(margin):
    """The log1p form: at margins 20-30 the loss is ~1e-9-1e-13, where logsumexp - s_target (what
    terms.contrastive computes) is 0 or an ulp of s_target in float32."""
    check_contrastive_near_optimum(blocked_contrastive.contrastive, DEVICE, margin)


def test_the_loss_may_be_edited_in_place():
    """The backward reads a private copy of the loss, not the returned tensor: editing that in place (a weighting,
    say) is allowed, where a saved output would fail the backward's version check."""
    rows = torch.randn(6, 8, device=DEVICE).requires_grad_()
    (expected,) = torch.autograd.grad(blocked_contrastive.contrastive(rows, rows, 0.5).sum(), rows)
    loss = blocked_contrastive.contrastive(rows, rows, 0.5)
    loss.mul_(1.0)
    (got,) = torch.autograd.grad(loss.sum(), rows)
    torch.testing.assert_close(got, expected)


def test_one_column_and_empty_batch():
    """A single column is its own target (loss 0, gradient 0); an empty batch gives an empty loss."""
    row = torch.randn(1, 5, device=DEVICE).requires_grad_()
    loss = blocked_contrastive.contrastive(row, row, 0.3)
    assert loss.tolist() == [0.0]
    loss.sum().backward()
    assert torch.equal(row.grad, torch.zeros_like(row))
    empty = torch.zeros(0, 5, device=DEVICE)
    assert blocked_contrastive.contrastive(empty, empty, 0.3).shape == (0,)


def test_nan_stays_in_its_row():
    """A NaN in one row's features makes that row's loss NaN and leaves the others finite when the columns are
    another tensor."""
    rows = torch.randn(6, 8, device=DEVICE)
    rows[2, 3] = float("nan")
    loss = blocked_contrastive.contrastive(rows, torch.randn(9, 8, device=DEVICE), 0.5, 1)
    assert loss[2].isnan() and torch.isfinite(loss[torch.arange(6) != 2]).all()


def test_pmrl_loss_with_the_blocked_backend(monkeypatch):
    """backend="blocked" runs the gram_eig op as "auto" would and the contrastive term blocked (its products
    recorded): the loss and gradient of the reference backend."""
    calls = _record_products(monkeypatch)
    z = torch.randn(12, 3, 16, generator=torch.Generator().manual_seed(2), device=DEVICE)
    results = []
    for backend in ("blocked", "reference"):
        x = z.clone().requires_grad_()
        loss = pmrl_loss(x, backend=backend)
        results.append((loss, *torch.autograd.grad(loss, x)))
        assert len(calls) == 3, backend  # the blocked run's 1 + 2 products (one block), none from the reference's
    for got, exact in zip(*results):
        torch.testing.assert_close(got, exact)
