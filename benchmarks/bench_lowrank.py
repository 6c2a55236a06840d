"""Low-rank wide factors vs dense factors vs laplace-torch, over layer width.

Model: one LoRA layer (r=8) on a frozen ``Linear(d, 64)`` applied to
`(batch, 16 tokens, d)` inputs, tanh, mean over tokens, frozen ``64 -> 3``
head. Its `lora_A` input factor is `d x d`: the wide factor. Contenders, in one
process: ``("lora","kron")`` low-rank (default rank 16, trace residual), the
same with dense factors (``lowrank_threshold=None``), and laplace-torch's
`KronLaplace` + `CurvlinopsGGN`. Fit time includes the eigendecomposition
(``la.fit``); factor memory counts what the fitted object keeps (raw factors
plus eigenvectors for the dense paths). Dense contenders are skipped, and
reported as such, above `--dense-max` (a `d x d` factor and its `eigh`).

A separate fresh process fits, tunes the prior, predicts and samples at width
65536 and reports its peak RSS (target < 2 GiB; dense would need 2 x 16 GiB).

Usage: ``python benchmarks/bench_lowrank.py [--repeats 3] [--output DIR]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import run_meta, write_results  # noqa: E402
from laplace import KronLaplace, Laplace  # noqa: E402
from laplace.curvature import CurvlinopsGGN  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402

import laplace_lora_backend  # noqa: E402, F401
from laplace_lora_backend.matrix import LoRAKron, LowRankFactor  # noqa: E402

N_CLASSES, TOKENS, N_DATA, BATCH = 3, 16, 32, 8
DEVICE = torch.device("cpu")


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


class WideIn(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.proj = nn.Linear(d, 64, bias=False)
        self.head = nn.Linear(64, N_CLASSES, bias=False)

    def forward(self, batch):
        return self.head(torch.tanh(self.proj(batch["input_ids"])).mean(1))


def make(d: int):
    torch.manual_seed(0)
    model = (
        get_peft_model(
            WideIn(d), LoraConfig(r=8, lora_alpha=16, target_modules=["proj"])
        )
        .eval()
        .to(DEVICE)
    )
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    # inputs with a decaying spectrum, as real activations have
    scales = torch.logspace(0, -2, d, device=DEVICE)
    data = [
        {
            "input_ids": torch.randn(TOKENS, d, device=DEVICE) * scales,
            "labels": torch.randint(0, N_CLASSES, (), device=DEVICE),
        }
        for _ in range(N_DATA)
    ]
    return model, torch.utils.data.DataLoader(data, batch_size=BATCH)


def factor_bytes(la) -> int:
    """Bytes of the factors the fitted Laplace object keeps."""
    if isinstance(la.H_facs, LoRAKron):
        raw = la.H_facs.factor_bytes()
    else:
        raw = sum(F.numel() * F.element_size() for b in la.H_facs.kfacs for F in b)
    eig = 0
    for vecs, vals in zip(la.H.eigenvectors, la.H.eigenvalues, strict=True):
        for Q, v in zip(vecs, vals, strict=True):
            if not isinstance(v, LowRankFactor):  # low-rank U is shared, not copied
                eig += (Q.numel() + v.numel()) * Q.element_size()
    return raw + eig


CONTENDERS = {
    "ours low-rank (k=16)": lambda m: Laplace(
        m, "classification", subset_of_weights="lora", hessian_structure="kron"
    ),
    "ours dense": lambda m: Laplace(
        m,
        "classification",
        subset_of_weights="lora",
        hessian_structure="kron",
        lowrank_threshold=None,
    ),
    "laplace KronLaplace+CurvlinopsGGN": lambda m: KronLaplace(
        m, "classification", backend=CurvlinopsGGN
    ),
}


def run_width(d: int, repeats: int, dense_max: int):
    model, loader = make(d)
    row = {"width": d}
    for name, build in CONTENDERS.items():
        if name != "ours low-rank (k=16)" and d > dense_max:
            row[name] = {
                "skipped": f"d x d factor ({d * d * 4 / 2**30:.1f} GiB fp32, kept "
                f"twice) and eigh({d}) exceed the per-cell budget"
            }
            continue
        times = []
        for _ in range(repeats):
            la = build(model)
            sync()
            t0 = time.perf_counter()
            la.fit(loader)
            sync()
            times.append(time.perf_counter() - t0)
        row[name] = {
            "fit_seconds": statistics.median(times),
            "bytes": factor_bytes(la),
        }
        print(f"  d={d:6d} {name:36s} {row[name]}", flush=True)
    return row


HUGE_SCRIPT = r"""
import resource, sys, time, torch
sys.path.insert(0, "benchmarks")
import bench_lowrank
from bench_lowrank import make, factor_bytes
from laplace import Laplace
torch.set_num_threads(int(sys.argv[2]))
bench_lowrank.DEVICE = torch.device(sys.argv[3])
d = int(sys.argv[1])
model, loader = make(d)
t0 = time.perf_counter()
la = Laplace(model, "classification", subset_of_weights="lora",
            hessian_structure="kron")
la.fit(loader)
t_fit = time.perf_counter() - t0
la.optimize_prior_precision(method="marglik", n_steps=50)
batch = next(iter(loader))
probs = la(batch, link_approx="probit")
samples = la.sample(16)
assert torch.isfinite(probs).all() and torch.isfinite(samples).all()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
print(f"RESULT {t_fit} {peak} {factor_bytes(la)} {float(la.prior_precision)} {gpu}")
"""


def run_huge(d: int, threads: int):
    out = subprocess.run(
        [sys.executable, "-c", HUGE_SCRIPT, str(d), str(threads), str(DEVICE)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = [x for x in out.splitlines() if x.startswith("RESULT")][-1]
    t_fit, peak, fbytes, prior, gpu = line.split()[1:]
    return {
        "width": d,
        "fit_seconds": float(t_fit),
        "peak_rss_bytes": int(peak),
        "peak_gpu_bytes": int(gpu),
        "factor_bytes": int(fbytes),
        "prior_precision": float(prior),
        "dense_would_need_bytes": 2 * d * d * 4,
    }


def plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in CONTENDERS:
        pts = [(r["width"], r[name]) for r in rows if "fit_seconds" in r[name]]
        if not pts:
            continue
        w = [p[0] for p in pts]
        axes[0].loglog(w, [p[1]["fit_seconds"] for p in pts], "o-", label=name)
        axes[1].loglog(w, [p[1]["bytes"] / 2**20 for p in pts], "o-", label=name)
    axes[0].set(xlabel="LoRA layer width d", ylabel="fit time [s]", title="Fit time")
    axes[1].set(
        xlabel="LoRA layer width d",
        ylabel="factor memory [MiB]",
        title="Kronecker factor memory",
    )
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def to_markdown(rows, huge, meta):
    names = list(CONTENDERS)
    lines = [
        "# Low-rank wide factors: fit time and factor memory vs width",
        "",
        f"`{meta['command']}` on {meta['machine']}, torch "
        f"{meta['torch']}, {meta['threads']} thread(s), median of {meta['repeats']} "
        f"fits. One LoRA layer (r=8) with a d-wide input factor; {N_DATA} examples "
        f"x {TOKENS} tokens, batches of {BATCH}, 3 classes, exact GGN.",
        "",
        "| width | "
        + " | ".join(f"{n} fit [s]" for n in names)
        + " | "
        + " | ".join(f"{n} MiB" for n in names)
        + " | dense / low-rank time | dense / low-rank memory"
        + " | Curvlinops / low-rank time |",
        "|---:|" + "---:|" * (2 * len(names) + 3),
    ]
    for r in rows:
        cells = [str(r["width"])]
        for key in ("fit_seconds", "bytes"):
            for n in names:
                v = r[n].get(key)
                if v is None:
                    cells.append("skipped")
                elif key == "bytes":
                    cells.append(f"{v / 2**20:.3f}")
                else:
                    cells.append(f"{v:.3f}")
        ours = r[names[0]]
        for n, key in (
            (names[1], "fit_seconds"),
            (names[1], "bytes"),
            (names[2], "fit_seconds"),
        ):
            v = r[n].get(key)
            cells.append(f"{v / ours[key]:.1f}x" if v else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Skipped cells: "
        + "; ".join(
            sorted(
                {
                    f"{n}: {r[n]['skipped']}"
                    for r in rows
                    for n in names
                    if "skipped" in r[n]
                }
            )
        )
        or "none",
        "",
    ]
    if huge:
        lines += [
            f"## Width {huge['width']} in a fresh process (fit, marglik prior, "
            "probit predictive, 16 samples)",
            "",
            f"- peak RSS: **{huge['peak_rss_bytes'] / 2**30:.2f} GiB** "
            "(target < 2 GiB)"
            + (
                f"; peak GPU allocation {huge['peak_gpu_bytes'] / 2**30:.2f} GiB"
                if huge["peak_gpu_bytes"]
                else ""
            ),
            f"- fit: {huge['fit_seconds']:.2f} s; factor memory: "
            f"{huge['factor_bytes'] / 2**20:.2f} MiB; tuned prior precision "
            f"{huge['prior_precision']:.3g}",
            f"- a dense input factor plus its eigenvectors would need "
            f"{huge['dense_would_need_bytes'] / 2**30:.1f} GiB",
            "",
        ]
    lines.append("![fit time and memory vs width](lowrank.png)")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--widths", type=int, nargs="+", default=[256, 1024, 4096, 16384]
    )
    parser.add_argument("--huge", type=int, default=65536)
    parser.add_argument("--dense-max", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default="benchmarks/results")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--suffix", default="", help="appended to result names")
    args = parser.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    torch.set_num_threads(args.threads)
    meta = run_meta("bench_lowrank.py", args, DEVICE)
    rows = [run_width(d, args.repeats, args.dense_max) for d in args.widths]
    huge = run_huge(args.huge, args.threads) if args.huge else None
    print("huge:", huge, flush=True)
    name = f"lowrank{args.suffix}"
    md = to_markdown(rows, huge, meta).replace("(lowrank.png)", f"({name}.png)")
    out = write_results(
        args.output, name, {"meta": meta, "widths": rows, "huge": huge}, md
    )
    plot(rows, out / f"{name}.png")


if __name__ == "__main__":
    main()
