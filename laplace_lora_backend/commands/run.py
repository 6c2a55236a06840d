"""``laplace-lora finetune | fit | predict | evaluate`` on users' files.

Each function takes the parsed arguments (`laplace_lora_backend.commands.
arguments`) and raises `CommandError` for bad input (the CLI prints it and
exits with 2). Outputs are written under a temporary name and moved into
place at the end: an interrupted run leaves no partial file.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from laplace import Laplace

from laplace_lora_backend._codec import atomic_write
from laplace_lora_backend.commands.files import CommandError, Table, read_table
from laplace_lora_backend.commands.task import (
    Base,
    TaskOptions,
    class_labels,
    encode,
    is_seq_cls,
    load_base,
)
from laplace_lora_backend.curvature.discovery import head_names
from laplace_lora_backend.demo.config import free_threads
from laplace_lora_backend.demo.finetune import predict_logits, train_map
from laplace_lora_backend.demo.metrics import classification_metrics
from laplace_lora_backend.demo.report import markdown_table, reliability_plot
from laplace_lora_backend.demo.splits import BatchList
from laplace_lora_backend.hf_models import as_logits_model
from laplace_lora_backend.llm.answer_tokens import AnswerTokenClassifier
from laplace_lora_backend.serialization import load_posterior

__all__ = ["evaluate", "finetune", "fit", "predict"]


# ------------------------------------------------------------------ helpers
def _task(args: argparse.Namespace, adapter: str | None) -> TaskOptions:
    """The task flags given, then those saved beside `adapter`, then defaults.

    Returns
    -------
    TaskOptions
    """
    given = TaskOptions(
        text_column=args.text_column,
        label_column=args.label_column,
        classes=args.classes.split(",") if args.classes else None,
        answers=args.answers.split(",") if args.answers else None,
        template=args.template,
        max_length=args.max_length,
    )
    return given.merged(TaskOptions.saved(adapter), is_seq_cls(args.base_model))


def _batches(table: Table, classes, task, base: Base, batch_size: int) -> list:
    batches = encode(table, classes, task, base.tokenizer, batch_size, base.seq_cls)
    return BatchList(batches) if table.labels is not None else batches


def _fix_classes(table: Table, task: TaskOptions, base: Base):
    """The classes (and answer tokens) of a labelled file, recorded in `task`.

    `task` then holds the classes and, for a causal LM, the answer words, so
    that the saved task reads the same way later.

    Returns
    -------
    classes : list[str]
    answer_ids : list[int] or None
    """
    classes, ids = class_labels(table, task, base)
    task.classes = classes
    if not base.seq_cls:
        task.answers = task.answers or [" " + c for c in classes]
    return classes, ids


def _classifier(base: Base, peft: torch.nn.Module, ids: list[int] | None):
    """`(batch, C)` logits: the head of a sequence classifier, else answers.

    Returns
    -------
    torch.nn.Module
    """
    if base.seq_cls:
        return as_logits_model(peft)
    return AnswerTokenClassifier(peft, ids)


def _adapted(lm: torch.nn.Module, adapter: str) -> torch.nn.Module:
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise CommandError(
            f"--adapter {adapter}: no adapter_config.json (a PEFT adapter folder, "
            "from model.save_pretrained or laplace-lora finetune)."
        )
    try:
        return PeftModel.from_pretrained(lm, adapter, local_files_only=True)
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0][:300]
        raise CommandError(
            f"--adapter {adapter} does not fit the base model (module names or "
            f"shapes differ): {first}"
        ) from None


def _into_dir(directory: str | Path, write: Callable[[Path], None]) -> Path:
    """Write files into a temporary folder, then move each into `directory`.

    Returns
    -------
    Path
        `directory`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tmp-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    try:
        write(tmp)
        for f in tmp.iterdir():
            os.replace(f, directory / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _write_file(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _setup(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads or free_threads())


def _posterior(directory: str, model: torch.nn.Module) -> Any:
    if not (Path(directory) / "laplace_posterior.json").is_file():
        raise CommandError(
            f"{directory}: no saved posterior (laplace_posterior.json); run "
            "laplace-lora fit first, or pass --posterior DIR."
        )
    try:
        return load_posterior(directory, model)
    except ValueError as err:
        raise CommandError(f"{directory}: {err}") from None


# ----------------------------------------------------------------- commands
def finetune(args: argparse.Namespace) -> dict[str, Any]:
    """MAP fine-tuning of a new LoRA adapter on a labelled file (the demo's).

    Returns
    -------
    dict[str, Any]
        The summary printed.

    Raises
    ------
    CommandError
        LoRA cannot be added (target modules not found).
    """
    from peft import LoraConfig, get_peft_model

    _setup(args)
    task = _task(args, None)
    table = read_table(args.data, task.text_column, task.label_column, True)
    base = load_base(args.base_model, args.device)
    classes, ids = _fix_classes(table, task, base)
    torch.manual_seed(args.seed)
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.1,
        target_modules=args.target_modules.split(",") if args.target_modules else None,
        # a sequence classifier's head is trained in full (modules_to_save)
        task_type="SEQ_CLS" if base.seq_cls else None,
    )
    try:
        peft = get_peft_model(base.model, config)
    except ValueError as err:  # e.g. target modules PEFT cannot find or guess
        first = str(err).strip().splitlines()[0][:300]
        raise CommandError(
            f"LoRA cannot be added to --base-model {args.base_model}: {first} Name "
            "the layers with --target-modules (e.g. q_proj,v_proj)."
        ) from None
    model = _classifier(base, peft, ids)
    batches = _batches(table, classes, task, base, args.batch_size)
    t0 = time.perf_counter()
    losses = train_map(
        model, batches, args.epochs * len(batches), args.lr, 0.01, not args.quiet
    )

    def write(tmp: Path) -> None:
        peft.save_pretrained(tmp)
        task.save(tmp)

    _into_dir(args.output, write)
    return {
        "adapter": str(args.output),
        "examples": len(table),
        "classes": classes,
        "steps": len(losses),
        "final_loss": losses[-1],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def fit(args: argparse.Namespace) -> dict[str, Any]:
    """Fit the Laplace posterior of an adapter on a labelled file and save it.

    Returns
    -------
    dict[str, Any]
        The summary printed.

    Raises
    ------
    CommandError
        ``--prior auto`` / ``gridsearch`` without ``--val-data``.
    """
    prior = args.prior or ("auto" if args.val_data else "marglik")
    if prior in ("auto", "gridsearch") and not args.val_data:
        raise CommandError(f"--prior {prior} needs --val-data FILE.")
    _setup(args)
    task = _task(args, args.adapter)
    table = read_table(args.data, task.text_column, task.label_column, True)
    vt = None
    if args.val_data:
        vt = read_table(args.val_data, task.text_column, task.label_column, True)
    base = load_base(args.base_model, args.device)
    classes, ids = _fix_classes(table, task, base)
    if vt is not None:
        class_labels(vt, task, base)  # its labels must be known classes
    model = _classifier(base, _adapted(base.model, args.adapter), ids).eval()
    train = _batches(table, classes, task, base, args.batch_size)
    t0 = time.perf_counter()
    la = Laplace(
        model,
        "classification",
        subset_of_weights="lora",
        hessian_structure=args.structure,
        modules_to_save=True,  # a SEQ_CLS head: named in the summary
    )
    la.fit(train, progress_bar=not args.quiet)
    if prior in ("auto", "gridsearch"):
        val = _batches(vt, classes, task, base, args.batch_size)
        la.optimize_prior_precision(method=prior, val_loader=val)
    else:
        la.optimize_prior_precision()
    output = args.output or args.adapter
    _into_dir(output, lambda tmp: (la.save_pretrained(tmp), task.save(tmp)))
    H = getattr(la, "H_facs", None) or la.H
    nbytes = H.factor_bytes() if hasattr(H, "factor_bytes") else H.numel() * 4
    return {
        "posterior": str(output),
        "structure": args.structure,
        "examples": int(la.n_data),
        "weight_tensors": len(la.lora_weights),  # LoRA factors and heads
        "lora_parameters": int(la.n_params),
        "heads": head_names(la.lora_weights),
        "curvature_mib": round(nbytes / 2**20, 2),
        "prior": prior,
        "prior_precision": [round(float(p), 6) for p in la.prior_precision[:4]],
        "log_marginal_likelihood": float(la.log_marginal_likelihood()),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _loaded(args: argparse.Namespace, require_labels: bool):
    """Task, table, batches, model and posterior of predict / evaluate.

    Returns
    -------
    tuple
        ``(task, table, classes, batches, model, la)``.
    """
    _setup(args)
    saved = args.posterior if args.posterior else args.adapter  # fit's settings
    task = _task(args, saved if TaskOptions.saved(saved) else args.adapter)
    table = read_table(args.data, task.text_column, task.label_column, require_labels)
    base = load_base(args.base_model, args.device)
    classes, ids = class_labels(table if table.labels else None, task, base)
    model = _classifier(base, _adapted(base.model, args.adapter), ids).eval()
    la = _posterior(args.posterior or args.adapter, model)
    batches = _batches(table, classes, task, base, args.batch_size)
    return task, table, classes, batches, model, la


def predict(args: argparse.Namespace) -> dict[str, Any]:
    """Write per-row predictions and uncertainty of the saved posterior.

    Per row: the predicted label, its probability, every class probability,
    entropy and mutual information (LA; MAP too with ``--with-map``).

    Returns
    -------
    dict[str, Any]
        The summary printed.
    """
    task, table, classes, batches, model, la = _loaded(args, False)
    rows = []
    g = torch.Generator().manual_seed(0)
    for b in batches:
        x = {k: v for k, v in b.items() if k != "labels"}
        u = la.predictive_uncertainty(x, generator=g)
        with torch.no_grad():
            map_probs = model(x).softmax(-1)
        for i in range(len(u.probs)):
            k = int(u.probs[i].argmax())
            row = {"prediction": classes[k], "probability": float(u.probs[i, k])}
            row.update({f"p_{c}": float(u.probs[i, j]) for j, c in enumerate(classes)})
            row["entropy"] = float(u.entropy[i])
            row["mutual_information"] = float(u.mutual_information[i])
            if args.with_map:
                m = int(map_probs[i].argmax())
                row["map_prediction"] = classes[m]
                row["map_probability"] = float(map_probs[i, m])
            rows.append(row)
    for row, text, j in zip(rows, table.texts, range(len(rows)), strict=True):
        row["text"] = text
        if table.labels is not None:
            row["label"] = table.labels[j]
    out = Path(args.output)
    if out.suffix == ".csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        _write_file(out, buf.getvalue())
    else:
        _write_file(out, "".join(json.dumps(r) + "\n" for r in rows))
    return {"predictions": str(out), "rows": len(rows), "classes": classes}


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """MAP vs LA on a labelled file: table (JSON, Markdown) and reliability PNG.

    Returns
    -------
    dict[str, Any]
        The metrics of both.
    """
    task, table, classes, batches, model, la = _loaded(args, True)
    labels = torch.cat([b["labels"] for b in batches])
    map_probs = predict_logits(model, batches).softmax(-1)
    la_probs = torch.cat(
        [la({k: v for k, v in b.items() if k != "labels"}) for b in batches]
    )
    probs = {"MAP": map_probs, "LA": la_probs}
    metrics = {m: classification_metrics(p, labels) for m, p in probs.items()}
    summary = {
        m: {**v, **{f"{k}_std": 0.0 for k in ("acc", "ece", "nll", "brier")}}
        for m, v in metrics.items()
    }
    title = f"{Path(args.adapter).name} on {table.path.name} ({len(table)} texts)"
    out = Path(args.output)
    result = {"data": str(table.path), "classes": classes, **metrics}

    def write(tmp: Path) -> None:
        (tmp / "evaluation.json").write_text(json.dumps(result, indent=1))
        md = markdown_table(summary, 1, title, ["MAP", "LA"])
        (tmp / "evaluation.md").write_text(md + "\n")
        run = {
            "labels": labels.tolist(),
            "probs": {m: p.tolist() for m, p in probs.items()},
            "metrics": metrics,
        }
        reliability_plot(run, tmp / "evaluation.png", title, ["MAP", "LA"])

    _into_dir(out, write)
    return {"output": str(out), **metrics}
