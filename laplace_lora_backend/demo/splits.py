"""Seeded train / validation / test batches of a data set."""

from __future__ import annotations

import torch

from laplace_lora_backend.demo.config import DemoConfig
from laplace_lora_backend.demo.data import TextDataset, tokenize_prompts

__all__ = ["BatchList", "make_splits"]


def _batches(enc: dict[str, torch.Tensor], bs: int) -> list[dict[str, torch.Tensor]]:
    n = len(enc["labels"])
    return [{k: v[i : i + bs] for k, v in enc.items()} for i in range(0, n, bs)]


class BatchList(list):
    """A list of batches with `.dataset` (laplace-torch reads its length)."""

    def __init__(self, batches):
        super().__init__(batches)
        self.dataset = range(sum(len(b["labels"]) for b in batches))


def make_splits(cfg: DemoConfig, data: TextDataset, tokenizer, seed: int):
    """Seeded train / validation subsets of the training data, and the test set.

    Returns
    -------
    dict[str, list]
        ``"train"``, ``"val"`` and ``"test"``: tokenized batches of
        ``cfg.batch_size`` (lists with a `.dataset` length for laplace-torch).
    """
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.train), generator=g).tolist()
    train = [data.train[i] for i in order[: cfg.n_train]]
    val = [data.train[i] for i in order[cfg.n_train : cfg.n_train + cfg.n_val]]
    test = data.test[: cfg.n_test]
    enc = {
        name: tokenize_prompts(data, split, tokenizer, cfg.max_length)
        for name, split in (("train", train), ("val", val), ("test", test))
    }
    return {k: BatchList(_batches(v, cfg.batch_size)) for k, v in enc.items()}
