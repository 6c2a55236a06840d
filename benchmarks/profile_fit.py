"""Where the time of a SmolLM2 fit goes: EF, MC Fisher and exact GGN.

Issue 17's workload: SmolLM2-135M, LoRA r=8 on q and v, 32 drug reviews
padded to 64 tokens, batches of 4, 3 classes, dense factors (the default at
576 wide). Each fit is timed against the floor it cannot beat, measured side
by side in the same process, alternating, medians of `--repeats`:

- ``fwd+bwd``: a plain forward and one backward pass to the LoRA weights per
  batch (the EF / MC floor);
- ``fwd+Cbwd``: one forward and `C` backward passes (the exact GGN's floor).

A fit (``la.fit``, which ends with laplace-torch's `KronLaplace`
eigendecomposition of the factors) is split into the curvature pass and the
eigendecomposition (timed again on its own after the fit); the fit is then
profiled once with `cProfile` into its parts: the model's forward, the
backward passes, the input and output factor accumulation, the checks, the
eigendecomposition and the rest (laplace-torch's loop, data handling).

Usage: ``python benchmarks/profile_fit.py [--repeats 3]``. Writes
``benchmarks/results/profile_fit.{json,md}``.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# run as `python benchmarks/<script>.py`: the repository root holds `benchmarks`
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from laplace import Laplace  # noqa: E402
from laplace.utils import symeig  # noqa: E402

import laplace_lora_backend  # noqa: E402,F401
from benchmarks.common import (  # noqa: E402
    command_line,
    machine,
    script_parser,
    write_results,
)
from benchmarks.suite.workloads import Loader, smollm2  # noqa: E402
from laplace_lora_backend import LoRAEF, LoRAGGN  # noqa: E402

FITS = {
    "EF": (LoRAEF, {}),
    "MC": (LoRAGGN, {"stochastic": True}),
    "GGN": (LoRAGGN, {}),
}
# (label, file name fragment, function name) whose cumulative time is a part
PARTS = [
    ("backward passes", "curvature/kfac.py", "_backward"),
    ("output factors (in backward hooks)", "curvature/kfac.py", "on_grad"),
    ("input factors", "curvature/kfac.py", "_input_factors"),
    ("model forward (with input hooks)", "curvature/lora.py", "_forward"),
    ("loss", "curvature/lora.py", "_loss"),
    ("checks of inputs / outputs", "curvature/lora.py", "_checked_inputs"),
    ("checks of batches", "laplace_lora_backend/validation.py", "checked_batches"),
    ("eigendecomposition", "matrix/kron.py", "decompose"),
]
PROBE = "laplace-torch's output-size probe (a forward)"


def _floor(wl, params, backwards: int) -> None:
    """One forward and `backwards` backward passes per batch."""
    loss = torch.nn.CrossEntropyLoss(reduction="sum")
    for b in wl.train:
        f = wl.model(b)
        if backwards == 1:
            torch.autograd.grad(loss(f, b["labels"]), params)
            continue
        p = f.softmax(-1).detach()
        for c in range(backwards):  # the GGN's output-wise passes
            torch.autograd.grad((f[:, c] * p[:, c]).sum(), params, retain_graph=True)


def _laplace(wl, name: str):
    backend, kwargs = FITS[name]
    return Laplace(
        wl.model,
        "classification",
        subset_of_weights="lora",
        hessian_structure="kron",
        backend=backend,
        backend_kwargs=kwargs,
        lowrank_threshold=None,
    )


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_fits(wl, repeats: int) -> dict:
    """Median seconds of the floors and of each fit's two stages.

    Returns
    -------
    dict
        ``{"fwd+bwd": s, "fwd+Cbwd": s, "EF": {"curvature": s, "eigh": s}, ...}``
    """
    params = [p for p in wl.model.parameters() if p.requires_grad]
    C = wl.meta["C"]
    loader = Loader(wl.train)
    cells = {
        "fwd+bwd": lambda: _floor(wl, params, 1),
        "fwd+Cbwd": lambda: _floor(wl, params, C),
    }
    times: dict[str, list] = {k: [] for k in [*cells, *FITS]}
    _floor(wl, params, 1)  # warm-up
    for i in range(repeats):
        names = list(times) if i % 2 == 0 else list(reversed(times))
        for name in names:
            if name in cells:
                times[name].append(_timed(cells[name]))
                continue
            la = _laplace(wl, name)
            torch.manual_seed(i)
            total = _timed(lambda la=la: la.fit(loader))
            eigh = _timed(lambda la=la: la.H_facs.decompose(damping=la.damping))
            times[name].append((total - eigh, eigh))
            del la
    out: dict = {k: statistics.median(times[k]) for k in cells}
    for name in FITS:
        out[name] = {
            "curvature": statistics.median(t[0] for t in times[name]),
            "eigh": statistics.median(t[1] for t in times[name]),
        }
    return out


def profile_parts(wl, name: str) -> dict[str, float]:
    """Seconds of each part of one curvature pass (cProfile, cumulative).

    Returns
    -------
    dict
        Part label -> seconds, with ``"total"`` and ``"other"``.
    """
    la = _laplace(wl, name)
    torch.manual_seed(0)
    prof = cProfile.Profile()
    prof.enable()
    t0 = time.perf_counter()
    la.fit(Loader(wl.train))
    total = time.perf_counter() - t0
    prof.disable()
    stats = pstats.Stats(prof).stats
    out: dict[str, float] = {"total": total}
    for label, file, func in PARTS:
        out[label] = sum(
            v[3] for (f, _, fn), v in stats.items() if f.endswith(file) and fn == func
        )
    # the output factors are accumulated inside the backward passes
    out["backward passes"] -= out["output factors (in backward hooks)"]
    # laplace-torch's fit runs the model once on the whole first batch to
    # learn the output size: a module call made from baselaplace.py's fit
    out[PROBE] = sum(
        ct
        for (f, _, fn), v in stats.items()
        if f.endswith("torch/nn/modules/module.py") and fn == "_wrapped_call_impl"
        for (cf, _, cfn), (_, _, _, ct) in v[4].items()
        if cf.endswith("laplace/baselaplace.py") and cfn == "fit"
    )
    out["other"] = total - sum(out[label] for label in [*_labels(), PROBE])
    # the eigendecomposition without sharing equal factors (as before)
    dense = [F for b in la.H_facs.kfacs for F in b if isinstance(F, torch.Tensor)]
    out["eigh of every factor"] = _timed(lambda: [symeig(F) for F in dense])
    out["eigh, equal factors once"] = _timed(la.H_facs.decompose)
    return out


def _labels() -> list[str]:
    return [label for label, _, _ in PARTS]


def to_markdown(result: dict) -> str:
    t = result["times"]
    base, cbase = t["fwd+bwd"], t["fwd+Cbwd"]
    lines = [
        f"`{result['command']}` ({result['machine']}; {result['workload']}; "
        f"medians of {result['repeats']} alternating repeats)",
        "",
        f"Floors: forward + backward {base:.2f} s; forward + {result['C']} "
        f"backward {cbase:.2f} s ({cbase / base:.2f}x).",
        "",
        "| fit | curvature pass (s) | x fwd+bwd | eigh (s) | fit incl. eigh x fwd+bwd "
        "| x its floor | target |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name in FITS:
        c, e = t[name]["curvature"], t[name]["eigh"]
        floor = cbase if name == "GGN" else base
        target = (
            f"<= 1.1x fwd+{result['C']}bwd"
            if name == "GGN"
            else "<= 1.15x (pass), <= 1.3x (incl. eigh)"
        )
        lines.append(
            f"| {name} | {c:.2f} | {c / base:.2f} | {e:.2f} | {(c + e) / base:.2f} "
            f"| {(c + e) / floor:.2f} | {target} |"
        )
    lines += [
        "",
        "Parts of one curvature pass (cProfile; its overhead inflates the "
        "total a little):",
        "",
    ]
    labels = [*_labels(), PROBE, "other"]
    lines.append("| part | " + " | ".join(FITS) + " |")
    lines.append("|---|" + "---:|" * len(FITS))
    for label in labels:
        cells = [
            f"{result['parts'][n][label]:.2f} s ({result['parts'][n][label] / result['parts'][n]['total']:.0%})"  # noqa: E501
            for n in FITS
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Eigendecomposition of the fitted factors, each factor vs equal "
        "factors once (q and v share their input factor):",
        "",
    ]
    for n in FITS:
        p = result["parts"][n]
        lines.append(
            f"- {n}: {p['eigh of every factor']:.2f} s -> "
            f"{p['eigh, equal factors once']:.2f} s"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = script_parser(__doc__).parse_args()
    torch.set_num_threads(args.threads)
    wl = smollm2(n=32, max_length=64, batch_size=4, targets=("q_proj", "v_proj"))
    result = {
        "command": command_line("benchmarks/profile_fit.py"),
        "machine": machine(args.threads),
        "workload": wl.name,
        "C": wl.meta["C"],
        "repeats": args.repeats,
        "times": time_fits(wl, args.repeats),
        "parts": {name: profile_parts(wl, name) for name in FITS},
    }
    write_results(args.output, "profile_fit", result, to_markdown(result))


if __name__ == "__main__":
    main()
