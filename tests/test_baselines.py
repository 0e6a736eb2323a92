import math

import pytest
import torch
import torch.nn.functional as F

from conftest import random_embeddings
from pmrl_kernels.baselines import gram_volume, gram_volume_loss, official_recipe_loss, pairwise_infonce_loss

LOSSES = [pairwise_infonce_loss, gram_volume_loss]


def unit(angle: float) -> torch.Tensor:
    return torch.tensor([math.cos(angle), math.sin(angle)], dtype=torch.float64)


def test_volume_of_two_unit_vectors_is_sine():
    angles = [0.3, 1.1, 2.0]
    a = torch.stack([unit(t) for t in angles])
    o = torch.stack([unit(0.0), unit(0.7), unit(math.pi / 2)])
    expected = torch.tensor([[abs(math.sin(t - s)) for s in (0.0, 0.7, math.pi / 2)] for t in angles],
                            dtype=torch.float64)
    torch.testing.assert_close(gram_volume(a, [o]), expected)


def test_volume_of_three_vectors():
    e = torch.eye(3, dtype=torch.float64)
    # orthonormal: unit cube; anchor in the span of the other two: flat, volume 0; scaled: volume scales
    torch.testing.assert_close(gram_volume(e[:1], [e[1:2], e[2:3]]), torch.ones(1, 1, dtype=torch.float64))
    flat = (e[1:2] + e[2:3]) / math.sqrt(2)
    torch.testing.assert_close(gram_volume(flat, [e[1:2], e[2:3]]), torch.zeros(1, 1, dtype=torch.float64))
    torch.testing.assert_close(gram_volume(2 * e[:1], [3 * e[1:2], e[2:3]]),
                               torch.full((1, 1), 6.0, dtype=torch.float64))


def symmetric_ce_by_hand(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of (row CE + column CE) / 2, written out with logsumexp."""
    b = logits.shape[0]
    rows = [torch.logsumexp(logits[i], 0) - logits[i, i] for i in range(b)]
    cols = [torch.logsumexp(logits[:, i], 0) - logits[i, i] for i in range(b)]
    return sum(0.5 * (r + c) for r, c in zip(rows, cols)) / b


def test_pairwise_by_hand():
    z = random_embeddings(5, 3, 4)
    zn = F.normalize(z, dim=-1)
    tau = 0.2
    expected = sum(symmetric_ce_by_hand(zn[:, 1] @ zn[:, m].T / tau) for m in (0, 2))
    torch.testing.assert_close(pairwise_infonce_loss(z, anchor=1, tau=tau), expected)


def test_gram_by_hand_two_modalities():
    # M = 2: the volume is |sin| of the angle between anchor_i and other_j
    angles_a, angles_o = [0.1, 1.0, 2.5], [0.2, 1.4, 2.0]
    z = torch.stack([torch.stack([unit(s), unit(t)]) for s, t in zip(angles_a, angles_o)])
    tau = 0.5
    volume = torch.tensor([[abs(math.sin(s - t)) for t in angles_o] for s in angles_a], dtype=torch.float64)
    torch.testing.assert_close(gram_volume_loss(z, tau=tau), symmetric_ce_by_hand(-volume / tau))


@pytest.mark.parametrize("loss", LOSSES)
def test_input_forms_and_reductions(loss):
    z = random_embeddings(6, 4, 8)
    per_instance = loss(z, reduction="none")
    assert per_instance.shape == (6,)
    torch.testing.assert_close(loss(list(z.unbind(1)), reduction="none"), per_instance)
    torch.testing.assert_close(loss(tuple(z.unbind(1)), reduction="none"), per_instance)
    torch.testing.assert_close(loss(z), per_instance.mean())
    torch.testing.assert_close(loss(z, reduction="sum"), per_instance.sum())
    torch.testing.assert_close(loss(z, anchor=-1), loss(z, anchor=3))
    # normalize=False on unit rows changes nothing
    torch.testing.assert_close(loss(F.normalize(z, dim=-1), normalize=False), loss(z))


@pytest.mark.parametrize("loss", LOSSES)
def test_gradients(loss):
    z = random_embeddings(5, 3, 6).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: loss(x, tau=0.3), (z,))
    zs = [random_embeddings(16, 1, 32, dtype=torch.float32, seed=s)[:, 0].requires_grad_(True) for s in range(4)]
    loss(zs).backward()
    for m, x in enumerate(zs):
        assert torch.isfinite(x.grad).all(), f"non-finite gradient on modality {m}"
        assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype,expected", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                            (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_output_dtype(loss, dtype, expected):
    assert loss(random_embeddings(4, 3, 8, dtype=dtype)).dtype == expected


@pytest.mark.parametrize("loss", LOSSES)
def test_bad_arguments(loss):
    z = random_embeddings(4, 3, 8)
    with pytest.raises(ValueError, match="anchor"):
        loss(z, anchor=3)
    with pytest.raises(TypeError, match="anchor"):
        loss(z, anchor=0.0)
    with pytest.raises(ValueError, match="tau"):
        loss(z, tau=0.0)
    with pytest.raises(TypeError, match="normalize"):
        loss(z, normalize=1)
    with pytest.raises(ValueError, match="reduction"):
        loss(z, reduction="avg")
    with pytest.raises(ValueError, match="M >= 2"):
        loss(z[:, :1])
    with pytest.raises(TypeError, match="embeddings"):
        loss(z.numpy())


def test_official_recipe_checks_its_arguments_like_the_other_losses():
    z = random_embeddings(4, 3, 8)
    torch.testing.assert_close(official_recipe_loss(list(z.unbind(1))), official_recipe_loss(z), rtol=0, atol=0)
    for kwargs, error, message in (({"tau": 0.0}, ValueError, "tau must be finite and > 0"),
                                   ({"tau_reg": math.nan}, ValueError, "tau_reg must be finite and > 0"),
                                   ({"reg_weight": -1.0}, ValueError, "reg_weight must be finite and >= 0"),
                                   ({"tau": "0.1"}, TypeError, "tau must be a real number"),
                                   ({"canonical": 1}, TypeError, "canonical must be a bool")):
        with pytest.raises(error, match=message):
            official_recipe_loss(z, **kwargs)
    for bad, error, message in ((z[:, :1], ValueError, "M >= 2"), (z.int(), TypeError, "floating tensor"),
                                (z[:0], ValueError, "B = 0"), ("text", TypeError, "embeddings must be a tensor")):
        with pytest.raises(error, match=message):
            official_recipe_loss(bad)
