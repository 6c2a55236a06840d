"""`laplace-lora finetune | fit | predict | evaluate` on files, end to end.

A tiny random Llama (the demo's, with a word-level tokenizer) is saved to
disk; a CSV of drug reviews is written; `finetune` makes an adapter, `fit`
its posterior, `predict` and `evaluate` read them, each as a subprocess. The
predictions must equal the Python API's on the same posterior. Every bad
input ends with a message naming the fix and exit code 2.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from laplace_lora_backend import load_posterior
from laplace_lora_backend.cli import main
from laplace_lora_backend.demo.data import load_dataset
from laplace_lora_backend.demo.models import tiny_model_and_tokenizer
from laplace_lora_backend.llm.answer_tokens import AnswerTokenClassifier

TEMPLATE = "Review: {text}\nSentiment:"
CLASSES = ["negative", "neutral", "positive"]


def _csv(path: Path, rows, header=("text", "label")) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cmd")
    data = load_dataset("drugreview")
    model, tok = tiny_model_and_tokenizer(data, seed=0)
    model.save_pretrained(tmp / "base")
    tok.save_pretrained(tmp / "base")
    rows = [(t, data.classes[y]) for t, y in data.train[:24]]
    _csv(tmp / "train.csv", rows)
    _csv(tmp / "val.csv", [(t, data.classes[y]) for t, y in data.train[24:36]])
    _csv(tmp / "unlabelled.csv", [(t,) for t, _ in data.test[:10]], ("text",))
    return tmp, data


def _cli(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "laplace_lora_backend", *args, "--quiet"],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def pipeline(workspace):
    tmp, _ = workspace
    common = ["--base-model", "base", "--max-length", "32"]
    steps = {
        "finetune": [
            "finetune", *common, "--data", "train.csv", "--output", "adapter",
            "--epochs", "2", "--template", TEMPLATE, "--classes", ",".join(CLASSES),
        ],
        "fit": [
            "fit", *common, "--adapter", "adapter", "--data", "train.csv",
            "--val-data", "val.csv",
        ],
        "predict": [
            "predict", *common, "--adapter", "adapter", "--data", "unlabelled.csv",
            "--output", "pred.jsonl", "--with-map",
        ],
        "evaluate": [
            "evaluate", *common, "--adapter", "adapter", "--data", "val.csv",
            "--output", "eval",
        ],
    }  # fmt: skip
    out = {}
    for name, args in steps.items():
        proc = _cli(tmp, *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = json.loads(proc.stdout[proc.stdout.index("{") :])
    return tmp, out


def test_the_pipeline_writes_adapter_posterior_predictions_and_evaluation(pipeline):
    tmp, out = pipeline
    adapter = tmp / "adapter"
    saved = ("adapter_config.json", "laplace_posterior.json", "laplace_lora_task.json")
    for f in saved:
        assert (adapter / f).is_file(), f
    assert out["fit"]["examples"] == 24 and out["fit"]["prior"] == "auto"
    rows = [json.loads(x) for x in (tmp / "pred.jsonl").read_text().splitlines()]
    assert len(rows) == 10 and "label" not in rows[0]
    assert {"prediction", "entropy", "mutual_information", "map_prediction"} <= set(
        rows[0]
    )
    assert all(abs(sum(r[f"p_{c}"] for c in CLASSES) - 1) < 1e-6 for r in rows)
    for f in ("evaluation.json", "evaluation.md", "evaluation.png"):
        assert (tmp / "eval" / f).is_file()
    assert set(json.loads((tmp / "eval/evaluation.json").read_text())) >= {"MAP", "LA"}
    assert not list(tmp.glob("**/.tmp*")) and not list(tmp.glob("**/.*.tmp"))


def test_predictions_equal_the_python_api(pipeline, workspace):
    tmp, _ = pipeline
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp / "base")
    tok.padding_side = "left"
    lm = AutoModelForCausalLM.from_pretrained(tmp / "base", attn_implementation="eager")
    ids = [tok.encode(" " + c, add_special_tokens=False)[0] for c in CLASSES]
    model = AnswerTokenClassifier(PeftModel.from_pretrained(lm, tmp / "adapter"), ids)
    la = load_posterior(tmp / "adapter", model.eval())
    from laplace_lora_backend.commands.files import read_table
    from laplace_lora_backend.commands.task import TaskOptions, encode

    task = TaskOptions(max_length=32).merged(TaskOptions.saved(tmp / "adapter"))
    table = read_table(tmp / "unlabelled.csv")
    probs = torch.cat([la(b) for b in encode(table, CLASSES, task, tok, 8)])
    rows = [json.loads(x) for x in (tmp / "pred.jsonl").read_text().splitlines()]
    got = torch.tensor([[r[f"p_{c}"] for c in CLASSES] for r in rows])
    assert torch.allclose(got, probs.float(), atol=1e-6)


def _bad(capsys, tmp, *args):
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        with pytest.raises(SystemExit) as exc:
            main([*args, "--quiet"])
    finally:
        os.chdir(cwd)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "case, match",
    [
        ("missing_file", "nope.csv: no such file"),
        ("missing_column", "no column 'body'.*--text-column"),
        ("empty", "no rows"),
        ("unknown_label", r"labels \['negative'.*\] are not among"),
        ("multi_token", "one token.*--answers"),
        ("template", "no {text} field"),
        ("not_utf8", "not UTF-8"),
        ("cuda", "CUDA is not available"),
        ("no_adapter", "no adapter_config.json"),
        ("batch_zero", "--batch-size: must be at least 1, got 0"),
        ("epochs_word", "--epochs: 'two' is not an integer"),
        ("auto_without_val", "--prior auto needs --val-data"),
    ],
)
def test_bad_input_names_the_fix_and_exits_2(workspace, capsys, case, match):
    tmp, data = workspace
    base = ["finetune", "--base-model", "base", "--output", "x", "--data"]
    (tmp / "empty.csv").write_text("text,label\n")
    (tmp / "latin1.csv").write_bytes("text,label\ncaf\xe9,positive\n".encode("latin-1"))
    args = {
        "missing_file": [*base, "nope.csv"],
        "missing_column": [*base, "train.csv", "--text-column", "body"],
        "empty": [*base, "empty.csv"],
        "unknown_label": [*base, "train.csv", "--classes", "positive,other"],
        "multi_token": [*base, "train.csv", "--answers", " a b, c"],
        "template": [*base, "train.csv", "--template", "no field here"],
        "not_utf8": [*base, "latin1.csv"],
        "cuda": [*base, "train.csv", "--device", "cuda"],
        "no_adapter": [
            "fit", "--base-model", "base", "--adapter", "train.csv", "--data",
            "train.csv",
        ],
        "batch_zero": [*base, "train.csv", "--batch-size", "0"],
        "epochs_word": [*base, "train.csv", "--epochs", "two"],
        # refused before any model, adapter or data is read
        "auto_without_val": [
            "fit", "--base-model", "nowhere", "--adapter", "nowhere", "--data",
            "nope.csv", "--prior", "auto",
        ],
    }[case]  # fmt: skip
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    err = _bad(capsys, tmp, *args)
    assert re.search(match, err), err


def test_a_posterior_of_another_adapter_is_refused(pipeline, capsys):
    tmp, _ = pipeline
    proc = _cli(
        tmp, "finetune", "--base-model", "base", "--data", "train.csv",
        "--output", "other", "--epochs", "1", "--lora-r", "4",
        "--template", TEMPLATE, "--max-length", "32",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    err = _bad(
        capsys, tmp, "predict", "--base-model", "base", "--adapter", "other",
        "--posterior", "adapter", "--data", "unlabelled.csv", "--output", "p.jsonl",
    )  # fmt: skip
    assert "adapter" in err and "p.jsonl" not in os.listdir(tmp)


def test_files_with_a_bom_multiline_fields_and_stray_commas(tmp_path):
    from laplace_lora_backend.commands.files import CommandError, read_table

    p = tmp_path / "bom.csv"
    p.write_text('\ufefftext,label\n"line one\nline two",a\n', encoding="utf-8")
    table = read_table(p)
    assert table.texts == ["line one\nline two"] and table.labels == ["a"]
    bad = tmp_path / "comma.csv"
    bad.write_text("text,label\nHello, world,1\n")
    with pytest.raises(CommandError, match="row 2 has more fields"):
        read_table(bad)


@pytest.fixture(scope="module")
def seq_cls_workspace(workspace):
    """A tiny Llama sequence classifier (its own head, 3 outputs) on disk."""
    from transformers import LlamaForSequenceClassification

    tmp, data = workspace
    lm, tok = tiny_model_and_tokenizer(data, seed=0)
    config = lm.config
    config.num_labels, config.pad_token_id = len(CLASSES), tok.pad_token_id
    config.id2label = dict(enumerate(CLASSES))
    config.label2id = {c: i for i, c in enumerate(CLASSES)}
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp / "seqbase")
    tok.save_pretrained(tmp / "seqbase")
    return tmp


def _run(capsys, tmp, *args) -> dict:
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        main([*args, "--quiet"])
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    return json.loads(out[out.index("{") :])


def test_a_sequence_classifier_reads_its_head_and_its_head_joins(
    seq_cls_workspace, capsys
):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from laplace_lora_backend.commands.files import read_table
    from laplace_lora_backend.commands.task import TaskOptions, encode
    from laplace_lora_backend.hf_models import as_logits_model

    tmp = seq_cls_workspace
    common = ["--base-model", "seqbase", "--max-length", "32"]
    tuned = _run(
        capsys, tmp, "finetune", *common, "--data", "train.csv", "--output",
        "seqadapter", "--epochs", "1",
    )  # fmt: skip
    assert tuned["classes"] == CLASSES  # the head's labels, in its order
    fit = _run(
        capsys, tmp, "fit", *common, "--adapter", "seqadapter", "--data", "train.csv"
    )
    assert fit["heads"] and all("score" in h for h in fit["heads"])
    _run(
        capsys, tmp, "predict", *common, "--adapter", "seqadapter", "--data",
        "unlabelled.csv", "--output", "seqpred.jsonl",
    )  # fmt: skip
    evaluation = _run(
        capsys, tmp, "evaluate", *common, "--adapter", "seqadapter", "--data",
        "val.csv", "--output", "seqeval",
    )  # fmt: skip
    assert 0.0 <= evaluation["LA"]["acc"] <= 1.0
    # the predictions are the Python API's on the same posterior
    tok = AutoTokenizer.from_pretrained(tmp / "seqbase")
    base = AutoModelForSequenceClassification.from_pretrained(tmp / "seqbase")
    model = as_logits_model(PeftModel.from_pretrained(base, tmp / "seqadapter"))
    la = load_posterior(tmp / "seqadapter", model.eval())
    assert {w.kind for w in la.lora_weights} >= {"A", "B", "head"}
    task = TaskOptions(max_length=32).merged(
        TaskOptions.saved(tmp / "seqadapter"), seq_cls=True
    )
    assert task.template == "{text}"
    table = read_table(tmp / "unlabelled.csv")
    batches = encode(table, CLASSES, task, tok, 8, special_tokens=True)
    probs = torch.cat([la(b) for b in batches])
    rows = [json.loads(x) for x in (tmp / "seqpred.jsonl").read_text().splitlines()]
    got = torch.tensor([[r[f"p_{c}"] for c in CLASSES] for r in rows])
    assert torch.allclose(got, probs.float(), atol=1e-6)


def test_a_head_that_does_not_fit_the_classes_is_refused(seq_cls_workspace, capsys):
    err = _bad(
        capsys, seq_cls_workspace, "finetune", "--base-model", "seqbase", "--data",
        "train.csv", "--output", "x", "--classes", "negative,positive",
    )  # fmt: skip
    assert "head has 3 outputs but there are 2 classes" in err
