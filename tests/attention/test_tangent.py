"""Attention with a closed-form forward derivative, and the switch to it.

References: forward-mode AD (`torch.func.jvp`, vectorised over directions by
`torch.func.vmap`) through transformers' own eager attention, and through a
plain float64 re-implementation of the eager formula (registered here) where
the model's eager attention computes its softmax in float32.
"""

from __future__ import annotations

import model_zoo
import pytest
import torch
import transformers as tf
from helpers import make_lm, rel_err
from torch import nn
from transformers import AttentionInterface, LlamaForCausalLM
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
)
from transformers.models.llama import modeling_llama

from laplace_lora_backend import attention as ta
from laplace_lora_backend.attention import tangent

REFERENCE = "test_float64_eager"


def _reference_attention(module, query, key, value, attention_mask, scaling, **kw):
    """The eager formula with `repeat_kv` and the softmax in float64."""
    g = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
    scores = query @ key.transpose(-1, -2) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    out = scores.softmax(-1) @ value
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(REFERENCE, _reference_attention)
AttentionMaskInterface.register(REFERENCE, ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def _assert_direct_jvp_matches_reference(q, k, v, mask):
    """`native_tangent_attention` called directly: output and JVP along random
    tangents of q, k, v equal forward-mode AD through the float64 reference."""
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))
    module = nn.Module().eval()

    def attention(fn):
        return lambda q, k, v: fn(module, q, k, v, mask, scaling=0.35)[0]

    ref = torch.func.jvp(attention(_reference_attention), (q, k, v), tangents)
    got = torch.func.jvp(attention(ta.native_tangent_attention), (q, k, v), tangents)
    assert rel_err(got[0], ref[0]) < 1e-12
    assert rel_err(got[1], ref[1]) < 1e-12


def _model(arch: str, dtype=torch.float64):
    lm, _ = make_lm(arch)
    return lm.to(dtype).eval()


def _batch(T: int = 7):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 40, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, T - 2 :] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask}


def _decoder_jvp(lm, implementation: str, x, K: int = 3):
    """Last hidden states and their tangents along K random directions of
    every query, key and value weight (so dq, dk and dv are all non-zero)."""
    decoder = lm.get_decoder()
    names = [
        n
        for n, _ in decoder.named_parameters()
        if any(k in n for k in ("q_proj", "k_proj", "v_proj", "c_attn"))
    ]
    params = dict(decoder.named_parameters())
    primals = tuple(params[n].detach() for n in names)
    g = torch.Generator().manual_seed(1)
    tangents = tuple(
        torch.randn(K, *p.shape, generator=g, dtype=p.dtype) for p in primals
    )

    def f(*w):
        out = torch.func.functional_call(
            decoder, dict(zip(names, w, strict=True)), (), {**x, "use_cache": False}
        )
        return out.last_hidden_state

    with torch.no_grad(), ta.attention_implementation(lm, implementation):
        with ta.tangent_directions(K):
            return torch.func.vmap(
                lambda *t: torch.func.jvp(f, primals, t), out_dims=(None, 0)
            )(*tangents)


@pytest.mark.parametrize("block_bytes", [ta.TANGENT_BLOCK_BYTES, 1])
@pytest.mark.parametrize(
    "arch, name, reference",
    [
        # GQA (4 query heads, 2 key/value heads); in float64 throughout
        ("llama", ta.NATIVE_ATTENTION_NAME, REFERENCE),
        # GPT-2's own eager attention (softmax in the input's dtype)
        ("gpt2", ta.NATIVE_ATTENTION_NAME, "eager"),
    ],
)
def test_tangents_equal_forward_mode_ad_through_eager_attention(
    arch, name, reference, block_bytes, monkeypatch
):
    monkeypatch.setattr(tangent, "TANGENT_BLOCK_BYTES", block_bytes)  # 1: a row a block
    lm, x = _model(arch), _batch()
    h_ref, dh_ref = _decoder_jvp(lm, reference, x)
    h, dh = _decoder_jvp(lm, name, x)
    assert dh.shape == (3, 2, 7, 32)
    assert rel_err(h, h_ref) < 1e-12
    assert rel_err(dh, dh_ref) < 1e-12
    assert rel_err(dh[0], dh_ref[1]) > 0.1  # the directions differ


def test_float32_softmax_follows_llamas_eager_attention():
    """Llama's eager attention takes the softmax in float32 even for a
    float64 model: so does `tangent_attention`, to float32 precision."""
    lm, x = _model("llama"), _batch()
    h_ref, dh_ref = _decoder_jvp(lm, "eager", x)
    h, dh = _decoder_jvp(lm, ta.ATTENTION_NAME, x)
    assert rel_err(h, h_ref) < 1e-12
    assert rel_err(dh, dh_ref) < 1e-6
    _, dh64 = _decoder_jvp(lm, ta.NATIVE_ATTENTION_NAME, x)
    assert rel_err(dh64, dh_ref) > 2 * rel_err(dh, dh_ref)  # measurably further


def test_row_blocks_are_sized_by_the_budget(monkeypatch):
    assert tangent.rows_per_block(1, 9, 512, 10) == tangent.TANGENT_BLOCK_BYTES // (
        10 * 9 * 512 * 4
    )
    assert tangent.rows_per_block(1, 9, 10**9, 10) == 1
    calls = []
    original = tangent._block_probs

    def spy(q, k_t, mask, scaling, rows, softmax_dtype):
        calls.append(rows)
        return original(q, k_t, mask, scaling, rows, softmax_dtype)

    monkeypatch.setattr(tangent, "_block_probs", spy)
    lm, x = _model("llama"), _batch(T=7)
    # 3 rows of (K=3, batch 2, 4 heads, 7 keys) float32 score tangents
    monkeypatch.setattr(tangent, "TANGENT_BLOCK_BYTES", 3 * 3 * 2 * 4 * 7 * 4)
    h, dh = _decoder_jvp(lm, ta.NATIVE_ATTENTION_NAME, x, K=3)
    starts = sorted({(r.start, r.stop) for r in calls})
    assert starts == [(0, 3), (3, 6), (6, 9)]
    # 2 layers, forward and JVP: 3 blocks each
    assert len(calls) == 2 * 2 * 3
    h_ref, dh_ref = _decoder_jvp(lm, REFERENCE, x)
    assert rel_err(dh, dh_ref) < 1e-12


def _call(module, **kwargs):
    q = torch.randn(1, 4, 3, 8)
    kv = torch.randn(1, 2, 3, 8)
    return ta.tangent_attention(module, q, kv, kv, None, **kwargs)


def test_options_it_does_not_reproduce_are_refused():
    module = nn.Module().eval()
    out, weights = _call(module, scaling=0.3, sliding_window=4, position_ids=None)
    assert out.shape == (1, 3, 4, 8) and weights is None
    _call(module, scaling=0.3, output_router_logits=True)  # a flag: fine
    for kwargs in (
        {},  # no scaling
        {"scaling": 0.3, "softcap": 50.0},  # Gemma-2
        {"scaling": 0.3, "s_aux": torch.zeros(4)},  # gpt-oss's sinks
        {"scaling": 0.3, "some_new_option": 1},
    ):
        with pytest.raises(ta.UnsupportedAttentionError):
            _call(module, **kwargs)
    with pytest.raises(ta.UnsupportedAttentionError, match="dropout"):
        _call(module.train(), scaling=0.3, dropout=0.1)
    _call(module.train(), scaling=0.3, dropout=0.0)  # no dropout: fine
    with pytest.raises(ta.UnsupportedAttentionError, match="3 key/value heads"):
        ta.tangent_attention(
            module.eval(),
            torch.randn(1, 4, 3, 8),
            *[torch.randn(1, 3, 3, 8)] * 2,
            None,
            scaling=0.3,
        )


@pytest.mark.parametrize(
    "arch, dtype, expected",
    [
        ("llama", torch.float64, ta.ATTENTION_NAME),  # float32 softmax
        ("llama", torch.float32, ta.ATTENTION_NAME),
        ("gpt2", torch.float64, ta.NATIVE_ATTENTION_NAME),
        ("gpt2", torch.bfloat16, ta.NATIVE_ATTENTION_NAME),  # checked in float64
        ("llama", torch.bfloat16, ta.ATTENTION_NAME),
        ("gemma2", torch.float64, None),  # soft-capped scores
    ],
)
def test_the_check_finds_the_models_own_attention(arch, dtype, expected):
    lm, x = _model(arch, dtype), _batch()
    before = lm.config._attn_implementation
    run = lambda: lm(**x).logits  # noqa: E731
    got = ta.matching_tangent_attention(lm, run)
    assert got == expected
    assert lm.config._attn_implementation == before


class _Frozen(LlamaForCausalLM):
    """A model whose attention cannot be switched (as custom code that does
    not dispatch through transformers' AttentionInterface)."""

    _can_set_attn_implementation_cached_value = False


def test_switching_is_undone_even_after_an_error():
    lm = _model("llama")
    lm.set_attn_implementation("sdpa")
    with pytest.raises(KeyError):
        with ta.attention_implementation(lm, ta.ATTENTION_NAME):
            assert lm.model.layers[1].self_attn.config._attn_implementation == (
                ta.ATTENTION_NAME
            )
            raise KeyError("inside")
    assert lm.config._attn_implementation == "sdpa"
    frozen = _Frozen(lm.config).eval()
    with pytest.raises(ta.UnsupportedAttentionError, match="cannot switch"):
        with ta.attention_implementation(frozen, ta.ATTENTION_NAME):
            pass
    assert frozen.config._attn_implementation == "sdpa"
    assert (
        ta.matching_tangent_attention(frozen, lambda: frozen(**_batch()).logits) is None
    )


@pytest.mark.parametrize("heads_in_mask", [1, 4])
def test_a_mask_per_head_or_shared(heads_in_mask):
    """Called directly with GQA inputs and a 4D additive mask (shared by the
    heads, as transformers builds it, or one per head, as a user may pass)."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 5, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 5, 8, generator=g, dtype=torch.float64) for _ in "kv")
    mask = torch.randn(2, heads_in_mask, 5, 5, generator=g, dtype=torch.float64)
    mask[..., 0, 3:] = torch.finfo(torch.float64).min  # hidden keys
    _assert_direct_jvp_matches_reference(q, k, v, mask)


@pytest.mark.parametrize(
    "family", [f for f, spec in model_zoo.FAMILIES.items() if spec[1] is not None]
)
def test_every_causal_family_of_the_zoo(family):
    """Each family's causal LM either gets a tangent attention whose JVP is
    forward-mode AD's through its own eager attention (to the float32
    softmax's precision), or is refused (then linearised through eager)."""
    make_config, causal_cls, _, _ = model_zoo.FAMILIES[family]
    torch.manual_seed(0)
    config = make_config()
    config._attn_implementation = "sdpa"  # transformers' default
    lm = causal_cls(config).double().eval()
    x = _batch()
    name = ta.matching_tangent_attention(lm, lambda: lm(**x).logits)
    assert name in ta.TANGENT_ATTENTIONS, f"{family}: {name}"
    assert lm.config._attn_implementation == "sdpa"
    h_ref, dh_ref = _decoder_jvp(lm, "eager", x)
    h, dh = _decoder_jvp(lm, name, x)
    assert rel_err(h, h_ref) < 1e-12
    assert rel_err(dh, dh_ref) < 1e-6


def _scaled_eager(module, query, key, value, attention_mask, scaling, **kwargs):
    """Llama's eager attention with the scores scaled by 1.05 more."""
    return ORIGINAL_EAGER(
        module, query, key, value, attention_mask, scaling * 1.05, **kwargs
    )


def _capped_eager(module, query, key, value, attention_mask, scaling, **kwargs):
    """Eager attention with soft-capped scores, 5 tanh(s / 5), no keyword."""
    g = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
    scores = 5 * torch.tanh(query @ key.transpose(-1, -2) * scaling / 5)
    if attention_mask is not None:
        scores = scores + attention_mask
    p = scores.softmax(-1, dtype=torch.float32).to(query.dtype)
    return (p @ value).transpose(1, 2).contiguous(), p


ORIGINAL_EAGER = modeling_llama.eager_attention_forward


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eager", [_scaled_eager, _capped_eager])
def test_the_check_refuses_a_different_formula(eager, dtype, monkeypatch):
    """A model family whose eager attention differs without saying so (no
    keyword): the check compares each call in float64, whatever the model's
    precision. (A check sees only what the batch exercises: on a random tiny
    model the scores are too small for a cap to show, hence larger ones.)"""
    lm, x = _model("llama", dtype), _batch()
    with torch.no_grad():  # scores of order one, where a cap of 5 shows
        for layer in lm.model.layers:
            layer.self_attn.q_proj.weight.mul_(40)
    run = lambda: lm(**x).logits  # noqa: E731
    assert ta.matching_tangent_attention(lm, run) == ta.ATTENTION_NAME  # unpatched
    monkeypatch.setattr(modeling_llama, "eager_attention_forward", eager)
    assert ta.eager_attention_of(lm.model.layers[0].self_attn) is eager
    assert ta.matching_tangent_attention(lm, run) is None


def test_left_padding_and_masks_that_broadcast(monkeypatch):
    """Left padding (float32: transformers' float64 eager mask overflows),
    and, called directly, a mask broadcast over the queries, fewer queries
    than keys (a cache), row blocks of one query."""
    monkeypatch.setattr(tangent, "TANGENT_BLOCK_BYTES", 1)
    lm, x = _model("llama", torch.float32), _batch()
    x["input_ids"] = x["input_ids"].flip(1)
    x["attention_mask"] = x["attention_mask"].flip(1)
    assert ta.matching_tangent_attention(lm, lambda: lm(**x).logits) == (
        ta.ATTENTION_NAME
    )
    h_ref, dh_ref = _decoder_jvp(lm, "eager", x)
    h, dh = _decoder_jvp(lm, ta.ATTENTION_NAME, x)
    assert rel_err(h, h_ref) < 1e-5 and rel_err(dh, dh_ref) < 1e-4
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 3, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 5, 8, generator=g, dtype=torch.float64) for _ in "kv")
    mask = torch.zeros(2, 1, 1, 5, dtype=torch.float64)
    mask[1, ..., :2] = torch.finfo(torch.float64).min  # padding keys
    _assert_direct_jvp_matches_reference(q, k, v, mask)


def test_each_sub_model_gets_its_own_attention_back():
    """A vision-language model whose sub-models use different attention
    implementations keeps each one after the switch."""
    vision = tf.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, image_size=8, patch_size=4,
    )  # fmt: skip
    text = tf.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    model = tf.LlavaForConditionalGeneration(
        tf.LlavaConfig(vision_config=vision, text_config=text, image_token_index=49)
    )
    model.set_attn_implementation(
        {"": "sdpa", "text_config": "sdpa", "vision_config": "eager"}
    )

    def state():
        c = model.config
        return (
            c._attn_implementation,
            c.text_config._attn_implementation,
            c.vision_config._attn_implementation,
        )

    with ta.attention_implementation(model, ta.ATTENTION_NAME):
        assert set(state()) == {ta.ATTENTION_NAME}
    assert state() == ("sdpa", "sdpa", "eager")
