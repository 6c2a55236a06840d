"""`SoftmaxAverage` and `entropy`: the sliced, in-place running average of
softmaxes against a reference that stacks every sample (float64), with
slices forced small so that rows split across several slices."""

from __future__ import annotations

import pytest
import torch

from laplace_lora_backend import uncertainty
from laplace_lora_backend.uncertainty import SoftmaxAverage, entropy


def reference(samples: torch.Tensor):
    """Probs, total entropy, expected entropy, MI from stacked logits."""
    p = samples.softmax(-1)
    probs = p.mean(0)
    ent = lambda q: -torch.special.xlogy(q, q).sum(-1)  # noqa: E731
    expected = ent(p).mean(0)
    return probs, ent(probs), expected, ent(probs) - expected


def averaged(samples: torch.Tensor, **kw):
    avg = SoftmaxAverage(**kw)
    for f in samples:
        avg.add(f)
    return avg.result()


@pytest.mark.parametrize("chunk", [5, 40, 2**18])
def test_average_matches_the_stacked_reference(monkeypatch, chunk):
    # 5 < V: one row per slice; 40: a few rows per slice; default: one slice
    monkeypatch.setattr(uncertainty, "CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    samples = 3 * torch.randn(6, 2, 7, 11, generator=g, dtype=torch.float64)
    for got, want in zip(averaged(samples), reference(samples), strict=True):
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=0, atol=1e-12)


def test_logits_are_not_modified():
    f = torch.randn(3, 4, 9)
    kept = f.clone()
    avg = SoftmaxAverage()
    avg.add(f)
    avg.add(f)
    assert torch.equal(f, kept)


def test_minus_infinity_logits_get_no_mass_and_nan_stays_nan(monkeypatch):
    monkeypatch.setattr(uncertainty, "CHUNK_ELEMENTS", 8)
    g = torch.Generator().manual_seed(1)
    samples = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)
    samples[:, 1, 2] = -torch.inf  # a masked token at every sample
    samples[2, 0, 0] = -torch.inf  # and in one sample only
    got = averaged(samples)
    for a, b in zip(got, reference(samples), strict=True):
        assert torch.isfinite(a).all()
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    assert torch.equal(got[0][1, 2], torch.zeros((), dtype=torch.float64))
    samples[1, 2, 3] = torch.nan
    probs, total, _, _ = averaged(samples)
    assert probs[2].isnan().all() and total[2].isnan()
    assert not probs[:2].isnan().any()


def test_half_precision_logits_accumulate_in_float32():
    samples = torch.randn(3, 2, 5, 13).to(torch.bfloat16)
    probs, total, expected, mi = averaged(samples)
    assert probs.dtype == torch.float32 and total.dtype == torch.float32
    want = reference(samples.double())
    assert torch.allclose(probs.double(), want[0], atol=1e-6)
    assert torch.allclose(expected.double(), want[2], atol=1e-5)


def test_misuse_is_refused_by_name():
    avg = SoftmaxAverage()
    with pytest.raises(ValueError, match="at least one sample"):
        avg.result()
    avg.add(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"first one's shape \(2, 5\)"):
        avg.add(torch.randn(3, 5))
    avg.add(torch.randn(2, 5))  # still usable after the refusal
    probs, *_ = avg.result()
    assert torch.allclose(probs.sum(-1), torch.ones(2))
    with pytest.raises(ValueError, match="already called"):
        avg.result()
    with pytest.raises(ValueError, match="start a new one"):
        avg.add(torch.randn(2, 5))


def test_sliced_entropy_equals_the_direct_one_and_keeps_gradients(monkeypatch):
    monkeypatch.setattr(uncertainty, "CHUNK_ELEMENTS", 6)
    p = torch.rand(2, 5, 4, dtype=torch.float64).softmax(-1)
    p[0, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)  # 0 log 0
    want = -torch.special.xlogy(p, p).sum(-1)
    assert torch.allclose(entropy(p), want, rtol=0, atol=1e-14)
    assert entropy(p[0, 1]).shape == ()
    q = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: entropy(t.softmax(-1)), (q,))
