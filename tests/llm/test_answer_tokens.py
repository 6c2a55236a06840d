"""AnswerTokenClassifier, trim_lm_head and HF models called without wrappers."""

from __future__ import annotations

import pytest
import torch
from helpers import make_batch, make_lm, make_loader, rel_err
from laplace import Laplace
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast, RobertaConfig
from transformers import RobertaForSequenceClassification as Roberta

import laplace_lora_backend  # noqa: F401
from laplace_lora_backend import find_lora_weights
from laplace_lora_backend.llm import AnswerTokenClassifier, trim_lm_head

ANSWERS = [5, 9, 17]


def classifier(arch="llama", trim=False, lora_on_head=False):
    lm, targets = make_lm(arch)
    lm = lm.double().eval()
    if trim:
        trim_lm_head(lm, ANSWERS)
    heads = ["lm_head"] if lora_on_head else []
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets + heads)
    return AnswerTokenClassifier(get_peft_model(lm, cfg), ANSWERS).eval(), lm


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_zero_lora_equals_base_model_at_last_real_token(arch):
    """With LoRA B = 0 (PEFT's init) the logits are the base model's answer
    logits at the last real token; left and right padding agree with the
    unpadded sequence."""
    clf, lm = classifier(arch)
    batch = make_batch(n=6, pad=True)
    out = clf(batch)
    assert out.shape == (6, 3)
    right = {
        "input_ids": torch.zeros_like(batch["input_ids"]),
        "attention_mask": torch.zeros_like(batch["attention_mask"]),
    }
    for i in range(6):
        keep = batch["attention_mask"][i].bool()
        ids = batch["input_ids"][i, keep]
        with torch.no_grad(), clf.model.disable_adapter():
            ref = lm(input_ids=ids[None]).logits[0, -1, ANSWERS]
        assert rel_err(out[i], ref) < 1e-10
        right["input_ids"][i, : len(ids)] = ids
        right["attention_mask"][i, : len(ids)] = 1
    assert rel_err(clf(right), out) < 1e-10


def test_trimmed_head_gives_the_same_logits_and_a_c_by_c_factor():
    """Trimming lm_head keeps the logits; LoRA on it has a C x C out factor."""
    full, _ = classifier("llama")
    trimmed, _ = classifier("llama", trim=True, lora_on_head=True)
    batch = make_batch(pad=True)
    assert rel_err(trimmed(batch), full(batch)) < 1e-10
    head = [w for w in find_lora_weights(trimmed) if "lm_head" in w.name]
    assert [tuple(w.param.shape) for w in head] == [(4, 32), (3, 4)]
    la = Laplace(
        trimmed,
        "classification",
        subset_of_weights="lora",
        hessian_structure="kron",
        lora_modules=["lm_head"],
    )
    la.fit(make_loader(batch))
    assert la.H_facs.kfacs[1][0].shape == (3, 3)  # lora_B output factor: C x C
    assert torch.isfinite(la(batch)).all()


def test_answer_strings_need_single_tokens():
    vocab = {"[UNK]": 0, "yes": 1, "no": 2, "maybe": 3}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    lm, _ = make_lm("llama")
    clf = AnswerTokenClassifier(lm, ["yes", "no"], tokenizer=tokenizer)
    assert clf.answer_ids == [1, 2]
    with pytest.raises(ValueError, match="one token"):
        AnswerTokenClassifier(lm, ["yes no", "maybe"], tokenizer=tokenizer)
    with pytest.raises(TypeError, match="tokenizer"):
        AnswerTokenClassifier(lm, ["yes", "no"])
    trim_lm_head(lm, [1, 2])
    with pytest.raises(ValueError, match="trimmed"):
        AnswerTokenClassifier(lm, [2, 1])


def test_sequence_classification_model_needs_no_wrapper():
    """A PEFT RoBERTa sequence classifier goes straight into Laplace."""
    torch.manual_seed(0)
    cfg = RobertaConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        num_labels=3,
        max_position_embeddings=40,
    )
    base = Roberta(cfg).double().eval()
    model = get_peft_model(
        base, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])
    )
    batch = make_batch(n=6, pad=False)
    with pytest.warns(UserWarning, match="modules_to_save.*classifier"):
        la = Laplace(
            model, "classification", subset_of_weights="lora", hessian_structure="kron"
        )
    la.fit(make_loader(batch))
    la.optimize_prior_precision(method="marglik", n_steps=10)
    probs = la(batch, link_approx="probit")
    assert probs.shape == (6, 3)
    assert torch.allclose(probs.sum(-1), torch.ones(6, dtype=torch.float64))
    # the LoRA weights and the classifier PEFT trains in full (modules_to_save)
    lora = [w for w in la.lora_weights if "lora_" in w.name]
    head = [w for w in la.lora_weights if w.kind in ("head", "bias")]
    assert len(lora) == 8 and len(head) == 4 and len(la.lora_weights) == 12
    assert all("classifier.modules_to_save" in w.name for w in head)


def test_peft_around_a_plain_module_is_called_as_is():
    """Only transformers models get `model(**batch).logits`; a PEFT-wrapped
    custom module taking the batch dict is called unchanged."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(6, 3)

        def forward(self, batch):
            return self.proj(batch["input_ids"].double())

    torch.manual_seed(0)
    net = get_peft_model(Net().double(), LoraConfig(r=2, target_modules=["proj"]))
    data = {"input_ids": torch.randn(6, 6), "labels": torch.randint(0, 3, (6,))}
    la = Laplace(
        net, "classification", subset_of_weights="lora", hessian_structure="kron"
    )
    assert la.model is net
    la.fit(make_loader(data))
    assert la(data).shape == (6, 3)
