"""Where the SmolLM2 fit time goes, and why laplace-torch's evidence differs by 0.5%.

One run (not a benchmark: single timings): a plain forward+backward over the
suite's 64 reviews, our EF fit with dense factors and the share of it spent in
the eigendecomposition; then the log marginal likelihood of ours with and
without the padding mask against laplace-torch's `KronLaplace` + `CurvlinopsGGN`.

Usage: ``python benchmarks/profile_smollm2_fit.py`` (about 4 min on 2 cores).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# run as `python benchmarks/<script>.py`: the repository root holds `benchmarks`
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from laplace import KronLaplace, Laplace  # noqa: E402
from laplace.curvature import CurvlinopsGGN  # noqa: E402

from benchmarks.suite.workloads import Loader, smollm2  # noqa: E402
from laplace_lora_backend import LoRAEF  # noqa: E402


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    torch.set_num_threads(2)
    wl = smollm2()
    loader = Loader(wl.train)
    lossfunc = torch.nn.CrossEntropyLoss(reduction="sum")

    def fwd_bwd() -> None:
        for b in wl.train:
            lossfunc(wl.model(b), b["labels"]).backward()
        wl.model.zero_grad(set_to_none=True)

    def ours(**kwargs):
        return Laplace(
            wl.model,
            "classification",
            subset_of_weights="lora",
            hessian_structure="kron",
            lowrank_threshold=None,
            **kwargs,
        )

    fwd_bwd()
    t_base = seconds(fwd_bwd)
    la = ours(backend=LoRAEF)
    la.fit(loader)
    t_fit = seconds(lambda: la.fit(loader))
    t_eig = seconds(lambda: la.H_facs.decompose(damping=la.damping))
    n_factors = sum(len(b) for b in la.H_facs.kfacs)
    print(
        f"forward+backward {t_base:.1f} s; EF fit {t_fit:.1f} s "
        f"({t_fit / t_base:.2f}x), of which eigh of {n_factors} factors "
        f"{t_eig:.1f} s ({t_eig / t_base:.2f}x)"
    )

    ref = KronLaplace(wl.model, "classification", backend=CurvlinopsGGN)
    ref.fit(loader)
    lml_ref = ref.log_marginal_likelihood().item()
    for label, kwargs in (
        ("masked (default)", {}),
        ("padding counted", {"backend_kwargs": {"mask_key": None}}),
    ):
        la = ours(**kwargs)
        la.fit(loader)
        lml = la.log_marginal_likelihood().item()
        print(
            f"lml ours {label}: {lml:.4f}; laplace-torch {lml_ref:.4f}; "
            f"rel. diff {abs(lml - lml_ref) / abs(lml_ref):.2e}"
        )
    pad = sum(int((b["attention_mask"] == 0).sum()) for b in wl.train)
    total = sum(b["attention_mask"].numel() for b in wl.train)
    print(f"padding tokens: {pad} of {total}")


if __name__ == "__main__":
    main()
