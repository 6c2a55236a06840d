"""`la.generate` with a posterior over the LoRA weights of a tiny Llama.

References decode without any cache: the whole sequence so far is run at
every step with the posterior samples put in by `torch.func.functional_call`
(the model is never modified there).
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    lm_laplace,
    make_lm_batch,
    make_loader,
    make_peft_causal_lm,
    make_peft_classifier,
)
from laplace import Laplace


def _fit(model):
    la = lm_laplace(model, prior_precision=4.0)
    la.fit(make_loader(make_lm_batch(n=6, T=6, seed=1), batch_size=3))
    return la


@pytest.fixture(scope="module")
def la():
    return _fit(make_peft_causal_lm())


def _probs(la, sample, seq):
    chunks = sample.split([p.numel() for p in la.params])
    weights = {
        w.name: c.view_as(w.param) for w, c in zip(la.lora_weights, chunks, strict=True)
    }
    with torch.no_grad():
        logits = torch.func.functional_call(la.model, weights, ({"input_ids": seq},))
    return logits[:, -1].softmax(-1)


def _entropy(p):
    return -(p * p.log()).sum(-1)


def _snapshot(la):
    return [p.detach().clone() for p in la.params]


def _unchanged(la, before):
    return all(torch.equal(p, b) for p, b in zip(la.params, before, strict=True))


PROMPT = torch.tensor([[5, 9, 17, 33], [8, 40, 2, 11]])


def test_model_average_equals_uncached_reference(la):
    before = _snapshot(la)
    K, n = 4, 5
    out = la.generate(
        PROMPT, max_new_tokens=n, mode="model_average", n_samples=K,
        generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    assert _unchanged(la, before)
    samples = la.sample(K, torch.Generator().manual_seed(7))
    seq = PROMPT.clone()
    for step in range(n):
        probs = torch.stack([_probs(la, s, seq) for s in samples])
        mean = probs.mean(0)
        token = mean.argmax(-1)
        assert torch.equal(out.sequences[:, PROMPT.shape[1] + step], token)
        mi = _entropy(mean) - _entropy(probs).mean(0)
        # cached vs uncached attention, RMSNorm in float32: float32 precision
        torch.testing.assert_close(
            out.entropy[:, step], _entropy(mean), rtol=1e-6, atol=1e-7
        )
        torch.testing.assert_close(
            out.mutual_information[:, step], mi, rtol=1e-5, atol=1e-7
        )
        seq = torch.cat([seq, token[:, None]], 1)
    assert out.generated.all()
    assert (out.mutual_information > 0).all()


def test_sample_per_sequence_decodes_each_row_under_its_own_sample(la):
    before = _snapshot(la)
    out = la.generate(
        PROMPT, max_new_tokens=4, mode="sample_per_sequence",
        generator=torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert _unchanged(la, before)
    assert out.mutual_information is None
    samples = la.sample(2, torch.Generator().manual_seed(3))
    for b in range(2):
        seq = PROMPT[b : b + 1]
        for step in range(4):
            p = _probs(la, samples[b], seq)
            token = p.argmax(-1)
            assert out.sequences[b, 4 + step] == token.item()
            torch.testing.assert_close(
                out.entropy[b, step], _entropy(p)[0], rtol=1e-6, atol=1e-7
            )
            seq = torch.cat([seq, token[:, None]], 1)


@pytest.mark.parametrize("mode", ["model_average", "sample_per_sequence"])
def test_map_weights_restored_bit_for_bit_after_an_exception(la, mode, monkeypatch):
    before = _snapshot(la)
    lm = la.model.model
    calls = {"n": 0}
    forward = lm.forward

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom inside decoding")
        return forward(*args, **kwargs)

    monkeypatch.setattr(lm, "forward", failing)
    with pytest.raises(RuntimeError, match="boom"):
        la.generate(PROMPT, max_new_tokens=4, mode=mode, n_samples=3)
    assert calls["n"] == 3
    assert _unchanged(la, before)
    # and the weights did change in between (the test can fail)
    monkeypatch.setattr(lm, "forward", forward)
    seen = []
    monkeypatch.setattr(
        lm,
        "forward",
        lambda *a, **k: seen.append(_snapshot(la)[0]) or forward(*a, **k),
    )
    la.generate(PROMPT, max_new_tokens=1, mode=mode, n_samples=2)
    assert not torch.equal(seen[0], before[0])


def test_eos_stops_a_row_and_pads_it(la):
    first = la.generate(PROMPT, max_new_tokens=4, mode="model_average", n_samples=2,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    eos = int(first.sequences[0, 5])  # row 0's second new token
    out = la.generate(
        PROMPT, max_new_tokens=4, mode="model_average", n_samples=2,
        eos_token_id=eos, pad_token_id=1, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    row = out.sequences[0, 4:].tolist()
    stop = row.index(eos)
    assert all(t == 1 for t in row[stop + 1 :])
    assert out.generated[0].tolist() == [i <= stop for i in range(len(row))]
    assert (out.entropy[0, stop + 1 :] == 0).all()


def test_left_padded_batch_generates_as_each_prompt_alone():
    la = _fit(make_peft_causal_lm().float())
    ids = torch.tensor([[0, 0, 5, 9], [8, 40, 2, 11]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    out = la.generate(
        ids, attention_mask=mask, max_new_tokens=4, n_samples=3,
        generator=torch.Generator().manual_seed(2),
    )  # fmt: skip
    for b, prompt in enumerate([ids[:1, 2:], ids[1:]]):
        alone = la.generate(
            prompt, max_new_tokens=4, n_samples=3,
            generator=torch.Generator().manual_seed(2),
        )  # fmt: skip
        assert torch.equal(out.sequences[b, 4:], alone.sequences[0, -4:])
        torch.testing.assert_close(out.entropy[b], alone.entropy[0])


def test_sampling_is_reproducible_and_tempered(la):
    kw = dict(max_new_tokens=6, mode="model_average", n_samples=2, do_sample=True)
    a = la.generate(PROMPT, generator=torch.Generator().manual_seed(5), **kw)
    b = la.generate(PROMPT, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(a.sequences, b.sequences)
    cold = la.generate(
        PROMPT, temperature=1e-4, generator=torch.Generator().manual_seed(5), **kw
    )
    greedy = la.generate(
        PROMPT,
        max_new_tokens=6,
        n_samples=2,
        generator=torch.Generator().manual_seed(5),
    )
    assert torch.equal(cold.sequences, greedy.sequences)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "beam"}, "mode"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"do_sample": True, "temperature": 0.0}, "temperature"),
        ({"attention_mask": torch.ones(2, 3)}, "attention_mask"),
    ],
)
def test_bad_arguments_are_named(la, kwargs, match):
    with pytest.raises(ValueError, match=match):
        la.generate(PROMPT, **kwargs)


def test_bad_input_ids_are_named(la):
    with pytest.raises(ValueError, match=r"input_ids\[None\]"):
        la.generate(PROMPT[0])
    with pytest.raises(TypeError, match="integer tensor"):
        la.generate(PROMPT.float())


def test_a_model_that_is_not_a_causal_lm_is_named():
    la = Laplace(
        make_peft_classifier("llama"),
        "classification",
        subset_of_weights="lora",
        hessian_structure="diag",
    )
    with pytest.raises(TypeError, match="LastTokenHead"):
        la.generate(PROMPT, max_new_tokens=2)
