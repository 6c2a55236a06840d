"""The classification task of a command: base model, answers, prompt, batches.

Causal LMs are read as classifiers over one-token answer words after a prompt
template (`AnswerTokenClassifier`), as in the demo. The task settings that
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

__all__ = ["TASK_FILE", "TaskOptions", "class_labels", "encode", "load_base"]

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

    def merged(self, saved: dict[str, Any]) -> TaskOptions:
        """These options, with unset ones from `saved` and then the defaults.

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
            "template": "Text: {text}\nAnswer:",
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


def load_base(name: str, device: str = "cpu") -> tuple[torch.nn.Module, Any]:
    """The base causal LM and its tokenizer: ``smollm2`` or a local folder.

    Returns
    -------
    model : transformers.PreTrainedModel
        In eval mode, on `device`.
    tokenizer : transformers tokenizer
        Left padding, with a pad token.

    Raises
    ------
    CommandError
        A folder that is not a transformers model, or CUDA asked for without it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError(f"--device {device}: CUDA is not available here.")
    if name == "smollm2":
        model, tok = load_smollm2()
    else:
        path = Path(name)
        if not (path / "config.json").is_file():
            raise CommandError(
                f"--base-model {name}: not 'smollm2' nor a folder with a "
                "transformers config.json (model.save_pretrained(folder))."
            )
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, attn_implementation="eager"
        )
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = "left"
    return model.to(device).eval(), tok


def class_labels(
    table: Table | None, task: TaskOptions, tokenizer: Any
) -> tuple[list[str], list[int]]:
    """The class names and the answer token of each class.

    Classes: ``task.classes``, else the distinct labels of the file (numbers
    in numeric order). Answers: ``task.answers``, else each class name after
    a space; each must be one token.

    Returns
    -------
    classes : list[str]
    answer_ids : list[int]

    Raises
    ------
    CommandError
        No classes known, labels outside the classes, or an answer that is
        not one token.
    """
    classes = task.classes
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
    answers = task.answers or [" " + c for c in classes]
    if len(answers) != len(classes):
        raise CommandError(
            f"--answers has {len(answers)} words for {len(classes)} classes."
        )
    try:
        ids = answer_token_ids(answers, tokenizer)
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
) -> list[dict[str, torch.Tensor]]:
    """Left-padded prompt batches (``labels`` only if the file has them).

    The text is truncated to fit `max_length` tokens with the template's
    other tokens; the template (the question) is never cut.

    Returns
    -------
    list[dict[str, torch.Tensor]]
    """

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    budget = max(8, task.max_length - len(ids(task.template.format(text=""))))
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
            add_special_tokens=False,
        )
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if table.labels is not None:
            index = {c: k for k, c in enumerate(classes)}
            batch["labels"] = torch.tensor(
                [index[v] for v in table.labels[i : i + batch_size]]
            )
        batches.append(batch)
    return batches
