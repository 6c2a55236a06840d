"""The classification task of a command: base model, answers, prompt, batches.

Causal LMs are read as classifiers over one-token answer words after a prompt
template (`AnswerTokenClassifier`), as in the demo. Sequence-classification
models (a saved ``...ForSequenceClassification``) read their own head: the
text goes in as it is (template ``{text}``), with the tokenizer's special
tokens, and the classes are the head's outputs. The task settings that
`finetune` used are saved beside the adapter (``laplace_lora_task.json``), so
`fit`, `predict` and `evaluate` need only the flags that differ.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from laplace_lora_backend.commands.files import CommandError, Table
from laplace_lora_backend.demo.smollm2 import load_smollm2
from laplace_lora_backend.llm.answer_tokens import answer_token_ids

__all__ = [
    "TASK_FILE",
    "Base",
    "TaskOptions",
    "class_labels",
    "encode",
    "is_seq_cls",
    "load_base",
]

TASK_FILE = "laplace_lora_task.json"


@dataclass
class TaskOptions:
    """The data and task flags shared by every command (`None`: not given)."""

    text_column: str | None = None
    label_column: str | None = None
    classes: list[str] | None = None
    answers: list[str] | None = None
    template: str | None = None
    max_length: int | None = None

    def merged(self, saved: dict[str, Any], seq_cls: bool = False) -> TaskOptions:
        """These options, with unset ones from `saved` and then the defaults.

        The default template is ``"{text}"`` for a sequence classifier
        (`seq_cls`), a question for a causal LM.

        Returns
        -------
        TaskOptions
            Every field set.

        Raises
        ------
        CommandError
            A template without ``{text}``.
        """
        defaults = {
            "text_column": "text",
            "label_column": "label",
            "template": "{text}" if seq_cls else "Text: {text}\nAnswer:",
            "max_length": 128,
        }
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                value = saved.get(f.name, defaults.get(f.name))
            out[f.name] = value
        if "{text}" not in out["template"]:
            raise CommandError(
                f"--template {out['template']!r} has no {{text}} field: write where "
                "the text goes, e.g. 'Review: {text}\\nSentiment:'."
            )
        return TaskOptions(**out)

    def save(self, directory: Path) -> None:
        """Write the options as ``laplace_lora_task.json`` in `directory`."""
        (directory / TASK_FILE).write_text(json.dumps(asdict(self), indent=1))

    @staticmethod
    def saved(directory: str | Path | None) -> dict[str, Any]:
        """Options saved beside an adapter (empty if none).

        Returns
        -------
        dict[str, Any]
        """
        path = Path(directory) / TASK_FILE if directory else None
        return json.loads(path.read_text()) if path and path.is_file() else {}


@dataclass
class Base:
    """A loaded base model and how the commands read it.

    Attributes
    ----------
    model : transformers.PreTrainedModel
        A causal LM, or a sequence classifier (`seq_cls`).
    tokenizer : transformers tokenizer
        With a pad token; left padding for a causal LM.
    seq_cls : bool
        A ``...ForSequenceClassification`` model: its head gives the classes.
    """

    model: torch.nn.Module
    tokenizer: Any
    seq_cls: bool

    @property
    def head_labels(self) -> list[str] | None:
        """The head's label names (`config.id2label`), unless HF's ``LABEL_i``."""
        if not self.seq_cls:
            return None
        id2label = getattr(self.model.config, "id2label", None) or {}
        names = [str(id2label[i]) for i in sorted(id2label)]
        return None if names == [f"LABEL_{i}" for i in range(len(names))] else names


def is_seq_cls(name: str) -> bool:
    """Whether the base model `name` is a saved sequence classifier.

    Read from its ``config.json`` (``architectures``) without loading it.

    Returns
    -------
    bool
        False for ``smollm2``, a causal LM, or a folder without a config.
    """
    path = Path(name) / "config.json"
    if name == "smollm2" or not path.is_file():
        return False
    try:
        architectures = json.loads(path.read_text()).get("architectures") or []
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in architectures)


def load_base(name: str, device: str = "cpu") -> Base:
    """The base model and its tokenizer: ``smollm2`` or a local folder.

    A folder whose config names a ``...ForSequenceClassification``
    architecture is loaded as a sequence classifier, any other as a causal LM.

    Returns
    -------
    Base
        The model in eval mode, on `device`.

    Raises
    ------
    CommandError
        A folder that is not a transformers model, or CUDA asked for without it.
    """
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: CUDA is not available here.")
    if name == "smollm2":
        model, tok = load_smollm2()
        return Base(model.to(device).eval(), tok, False)
    path = Path(name)
    if not (path / "config.json").is_file():
        raise CommandError(
            f"--base-model {name}: not 'smollm2' nor a folder with a "
            "transformers config.json (model.save_pretrained(folder))."
        )
    seq_cls = is_seq_cls(name)
    auto = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = auto.from_pretrained(
        path, local_files_only=True, attn_implementation="eager"
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if seq_cls and model.config.pad_token_id is None:  # finds the last real token
        model.config.pad_token_id = tok.pad_token_id
    if not seq_cls:
        tok.padding_side = "left"
    return Base(model.to(device).eval(), tok, seq_cls)


def class_labels(
    table: Table | None, task: TaskOptions, base: Base
) -> tuple[list[str], list[int] | None]:
    """The class names and, for a causal LM, the answer token of each class.

    Classes: ``task.classes``, else the head's label names (a sequence
    classifier), else the distinct labels of the file (numbers in numeric
    order). Answers: ``task.answers``, else each class name after a space;
    each must be one token.

    Returns
    -------
    classes : list[str]
    answer_ids : list[int] or None
        None for a sequence classifier.

    Raises
    ------
    CommandError
        No classes known, labels outside the classes, an answer that is not
        one token, or a head with another number of outputs.
    """
    classes = task.classes or base.head_labels
    if classes is None:
        if table is None or table.labels is None:
            raise CommandError(
                "The classes are unknown: give --classes, or labelled data."
            )
        distinct = set(table.labels)
        numeric = all(v.lstrip("-").isdigit() for v in distinct)
        classes = sorted(distinct, key=int if numeric else str)
    if table is not None and table.labels is not None:
        unknown = sorted(set(table.labels) - set(classes))
        if unknown:
            raise CommandError(
                f"{table.path}: labels {unknown[:5]} are not among the classes "
                f"{classes}."
            )
    if base.seq_cls:
        n_out = base.model.config.num_labels
        if n_out != len(classes):
            raise CommandError(
                f"--base-model's classification head has {n_out} outputs but there "
                f"are {len(classes)} classes {classes}; give --classes in the head's "
                "order, or a model whose head fits the data."
            )
        return list(classes), None
    answers = task.answers or [" " + c for c in classes]
    if len(answers) != len(classes):
        raise CommandError(
            f"--answers has {len(answers)} words for {len(classes)} classes."
        )
    try:
        ids = answer_token_ids(answers, base.tokenizer)
    except ValueError as err:
        raise CommandError(
            f"{err} Give one-token answer words with --answers (e.g. ' yes,' "
            "' no'), in the order of the classes."
        ) from None
    return list(classes), ids


def encode(
    table: Table,
    classes: list[str],
    task: TaskOptions,
    tokenizer: Any,
    batch_size: int,
    special_tokens: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Padded prompt batches (``labels`` only if the file has them).

    The text is truncated to fit `max_length` tokens with the template's
    other tokens (and the tokenizer's special tokens, if `special_tokens`:
    a sequence classifier's); the template (the question) is never cut.

    Returns
    -------
    list[dict[str, torch.Tensor]]
    """

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    reserved = len(ids(task.template.format(text="")))
    if special_tokens:
        reserved += tokenizer.num_special_tokens_to_add()
    budget = max(8, task.max_length - reserved)
    prompts = [
        task.template.format(
            text=tokenizer.decode(ids(t)[:budget], skip_special_tokens=True)
        )
        for t in table.texts
    ]
    batches = []
    for i in range(0, len(prompts), batch_size):
        enc = tokenizer(
            prompts[i : i + batch_size],
            padding=True,
            return_tensors="pt",
            add_special_tokens=special_tokens,
        )
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if table.labels is not None:
            index = {c: k for k, c in enumerate(classes)}
            batch["labels"] = torch.tensor(
                [index[v] for v in table.labels[i : i + batch_size]]
            )
        batches.append(batch)
    return batches
