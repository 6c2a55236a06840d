"""Did a refactor move the benchmark figures? Two revisions, side by side.

Runs the benchmark suite's SmolLM2 workload (LoRA q,v,lm_head, 64 drug
reviews x 48 tokens, 3 classes) under two git revisions of the package, in
alternating subprocesses (so that the machine's state is shared), and reports
per revision the median over repeats of: a plain forward+backward pass, the
fits (exact GGN, MC Fisher, EF; dense factors as the suite's README figures),
the probit predictive of one batch, each also as a ratio to the
forward+backward; plus the log marginal likelihood at prior precision 1, which
must agree to float rounding if the code path is the same.

Usage (from the repository root; the old revision is checked out with
``git worktree`` into a temporary folder)::

    python benchmarks/compare_revisions.py OLD_REV [--new HEAD] [--repeats 3]

Writes ``benchmarks/results/compare_revisions.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CELLS = ["fwd+bwd", "fit GGN", "fit MC", "fit EF", "predict probit"]


def measure() -> dict:
    """One repeat in this process (the revision is the one on sys.path)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from laplace import Laplace

    import laplace_lora_backend
    from laplace_lora_backend import LoRAEF, LoRAGGN

    try:  # the suite's workload module, before and after it left the package
        from benchmarks.suite.workloads import smollm2
    except ImportError:
        from laplace_lora_backend.bench.workloads import smollm2

    class Loader(list):  # laplace-torch reads len(loader.dataset)
        def __init__(self, batches):
            super().__init__(batches)
            self.dataset = range(sum(len(b["labels"]) for b in batches))

    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    w = smollm2()
    w.train = Loader(w.train)
    out = {"package": str(Path(laplace_lora_backend.__file__).parent)}

    def timed(fn):
        t0 = time.perf_counter()
        value = fn()
        return time.perf_counter() - t0, value

    def fwd_bwd():
        for b in w.train:
            w.model.zero_grad()
            logits = w.model(b)
            torch.nn.functional.cross_entropy(logits, b["labels"]).backward()

    out["fwd+bwd"], _ = timed(fwd_bwd)
    for name, backend, kwargs in (
        ("GGN", LoRAGGN, {}),
        ("MC", LoRAGGN, {"stochastic": True}),
        ("EF", LoRAEF, {}),
    ):
        la = Laplace(
            w.model,
            "classification",
            subset_of_weights="lora",
            hessian_structure="kron",
            backend=backend,
            backend_kwargs=kwargs,
            lowrank_threshold=None,  # dense factors, as the suite's figures
        )
        torch.manual_seed(0)
        out[f"fit {name}"], _ = timed(lambda la=la: la.fit(w.train))
        out[f"lml {name}"] = float(la.log_marginal_likelihood(torch.tensor(1.0)))
        if name == "GGN":
            la.prior_precision = 1.0
            out["predict probit"], _ = timed(lambda la=la: la(w.test))
    return out


def run_revision(root: Path, threads: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root), THREADS=str(threads))
    env["OMP_NUM_THREADS"] = str(threads)
    # this file is loaded by path: the revision's root alone is on sys.path
    code = (
        "import importlib.util, json, sys; "
        "spec = importlib.util.spec_from_file_location('cmp', sys.argv[1]); "
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "print('RESULT' + json.dumps(m.measure()))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).resolve())],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"measure() failed under {root}:\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT") :])


def to_markdown(result: dict) -> str:
    revs = list(result["medians"])
    packages = {r: result["runs"][r][0]["package"] for r in revs}
    lines = [
        f"`{result['command']}` ({result['machine']}; medians of "
        f"{result['repeats']} alternating repeats, seconds and x fwd+bwd)",
        "",
        "| cell | " + " | ".join(revs) + " | new / old |",
        "|---|" + "---:|" * (len(revs) + 1),
    ]
    note = ", ".join(f"{r}: `{p}`" for r, p in packages.items())
    old, new = (result["medians"][r] for r in revs)
    for c in CELLS:
        cells = []
        for r in revs:
            m = result["medians"][r]
            ratio = "" if c == "fwd+bwd" else f" ({m[c] / m['fwd+bwd']:.2f}x)"
            cells.append(f"{m[c]:.2f} s{ratio}")
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {new[c] / old[c]:.3f} |")
    for name in ("GGN", "MC", "EF"):
        k = f"lml {name}"
        lines.append(
            f"| log marglik {name} | "
            + " | ".join(f"{result['medians'][r][k]:.6f}" for r in revs)
            + f" | diff {abs(new[k] - old[k]):.1e} |"
        )
    return "\n".join(lines) + f"\n\nPackages imported: {note}.\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("old")
    parser.add_argument("--new", default=None, help="default: this working tree")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default="benchmarks/results")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    roots = {}
    for label, rev in (("old", args.old), ("new", args.new)):
        if rev is None:
            roots[f"{label} (working tree)"] = ROOT
            continue
        path = tmp / label
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(path), rev],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        roots[f"{label} ({rev})"] = path
    runs: dict[str, list[dict]] = {k: [] for k in roots}
    try:
        for i in range(args.repeats):
            order = list(roots) if i % 2 == 0 else list(reversed(roots))
            for label in order:
                runs[label].append(run_revision(roots[label], args.threads))
                print(label, runs[label][-1], flush=True)
    finally:
        for path in roots.values():
            if path != ROOT:
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(path)], cwd=ROOT
                )
    command = "python benchmarks/compare_revisions.py " + " ".join(sys.argv[1:])
    print(write_result(runs, command, args.threads, Path(args.output)))


def write_result(runs: dict[str, list[dict]], command: str, threads: int, out: Path):
    """Medians of the repeats, written as ``compare_revisions.{json,md}``.

    Returns
    -------
    str
        The Markdown table.
    """
    import torch

    keys = CELLS + [f"lml {n}" for n in ("GGN", "MC", "EF")]
    medians = {
        label: {k: statistics.median(r[k] for r in rs) for k in keys}
        for label, rs in runs.items()
    }
    result = {
        "command": command,
        "machine": f"{os.cpu_count()} cores, torch {torch.__version__}, "
        f"{threads} threads",
        "repeats": min(len(rs) for rs in runs.values()),
        "runs": runs,
        "medians": medians,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_revisions.json").write_text(json.dumps(result, indent=1))
    (out / "compare_revisions.md").write_text(to_markdown(result))
    return to_markdown(result)


if __name__ == "__main__":
    main()
