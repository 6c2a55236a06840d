"""Cost of the Bayesian next-token predictive: time in forward passes, peak memory.

SmolLM2-135M-Instruct with LoRA r=8 on q and v (as `bench_generation.py`)
and a K-FAC posterior fitted on ``--n-train`` BBC articles without
fine-tuning (the scoring cost does not depend on the posterior's data). For
one real sequence cut to each length (``--lengths``) it times

- a plain forward pass of the PEFT model (``la.model(x)``, no gradients);
- ``la.next_token_predictive(x, "nn", K)``: `K` weight samples;
- ``"glm"``: the linearised predictive, `K` directions in one vectorised JVP
  through the decoder (the default where the model splits into decoder and
  linear head);
- ``"glm", chunk_size=1``: one direction per JVP through the whole model
  (what a model without that split pays, one direction at a time).

Each repetition times a forward pass and then one method, so each method's
time is divided by a forward pass measured just before it; the median ratio
over ``--repeats`` is reported (the first length starts with one untimed call
of each). Peak memory is measured in a separate call of each (not timed):
the largest total of live tensor bytes above the start of the call, on CUDA
``max_memory_allocated``, on CPU the running sum of the torch profiler's
allocation events (exact for tensors and independent of the C allocator,
which keeps freed pages and makes the process's RSS say little). With it:
the size of one logits tensor `(1, tokens, V)` and each method's peak above
the forward pass's peak in logits tensors ("extra logits").

Usage::

    python benchmarks/bench_generation_cost.py --threads 1
    python benchmarks/bench_generation_cost.py --tiny     # tiny Llama, seconds

Measured on this repository's 2-core CPU machine at ``--threads 1`` with
nothing else running: about 30 min (mostly the one-direction-per-JVP rows).
Writes ``cost.json`` and ``cost.md`` under ``--output`` (default
``benchmarks/results/generation``).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from benchmarks.bench_generation import (  # noqa: E402
    GenConfig,
    one_sequence,
    posterior_without_finetuning,
)
from benchmarks.common import (  # noqa: E402
    command_line,
    script_parser,
    timed,
    write_results,
)

METHODS = (  # name, pred_type, chunk_size
    ("sampling", "nn", None),
    ("linearised", "glm", None),  # default: K directions per JVP
    ("linearised_one_per_jvp", "glm", 1),
)
MEMORY_METHODS = ("sampling", "linearised")  # the defaults' memory


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of live CPU tensor bytes during ``fn()``, above its start.

    The running sum of the allocation (+) and free (-) events the torch
    profiler records with ``profile_memory=True``; frees of tensors older
    than the call count too, so the peak is relative to the start.

    Returns
    -------
    int
    """
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak tensor bytes of ``fn()`` above its start (CUDA or CPU).

    Returns
    -------
    int
    """
    if not device.startswith("cuda"):
        return cpu_peak_bytes(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def cost_row(
    la, x: dict, cfg: GenConfig, vocab: int, repeats: int, warm_up: bool
) -> dict:
    """Time ratios and memory of every method on one batch `x` of one row.

    Returns
    -------
    dict
    """
    K = cfg.n_samples

    def forward() -> None:
        with torch.no_grad():
            la.model(x)

    calls = {
        name: (lambda p=p, c=c: la.next_token_predictive(x, p, K, chunk_size=c))
        for name, p, c in METHODS
    }
    if warm_up:
        forward()
        for call in calls.values():
            call()
    fwd, ratios, secs = [], {n: [] for n in calls}, {n: [] for n in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            _, f = timed(forward, cfg.device)
            _, s = timed(call, cfg.device)
            fwd.append(f)
            secs[name].append(s)
            ratios[name].append(s / f)
    T = x["input_ids"].shape[1]
    logits_bytes = T * vocab * 4
    fwd_peak = peak_bytes(forward, cfg.device)
    row = {
        "tokens": T,
        "K": K,
        "logits_mib": logits_bytes / 2**20,
        "forward_s": statistics.median(fwd),
        "forward_peak_mib": fwd_peak / 2**20,
    }
    for name in calls:
        row[f"{name}_s"] = statistics.median(secs[name])
        row[f"{name}_forward_passes"] = statistics.median(ratios[name])
        if name in MEMORY_METHODS:
            peak = peak_bytes(calls[name], cfg.device)
            row[f"{name}_peak_mib"] = peak / 2**20
            row[f"{name}_extra_logits"] = (peak - fwd_peak) / logits_bytes
    return row


def run(cfg: GenConfig, repeats: int) -> dict:
    """Fit the posterior, then one `cost_row` per length in `cfg.cost_lengths`.

    Returns
    -------
    dict
    """
    t0 = time.perf_counter()
    la, tokens = posterior_without_finetuning(cfg)
    with torch.no_grad():
        vocab = la.model(tokens[None, :1]).shape[-1]
    rows = []
    for i, T in enumerate(tqdm(cfg.cost_lengths, desc="lengths")):
        x = one_sequence(tokens, T)
        rows.append(cost_row(la, x, cfg, vocab, repeats, warm_up=i == 0))
    return {
        "cost": rows,
        "config": {
            **asdict(cfg),
            "repeats": repeats,
            "n_lora_params": la.n_params,
            # the attention the linearised predictive's JVPs went through
            "jvp_attention": la.jvp_attention(one_sequence(tokens, 8)),
        },
        "seconds": time.perf_counter() - t0,
    }


def to_markdown(result: dict, command: str) -> str:
    """The table of `run`'s rows, with its command and settings.

    Returns
    -------
    str
    """
    cfg = result["config"]
    lines = [
        f"`{command}`: {cfg['model']}, LoRA r={cfg['r']} on {cfg['targets']}, "
        f"K={cfg['n_samples']}, one sequence; time: medians of {cfg['repeats']} "
        "ratios to a plain forward pass timed just before; memory: peak live "
        "tensor bytes above the start of one call, and the excess over the "
        f"forward pass's peak in logits tensors; JVPs through "
        f"`{cfg.get('jvp_attention')}` attention. {result['seconds']:.0f} s.",
        "",
        "| tokens | forward s | sampling (fwd passes) | linearised (fwd passes) "
        "| linearised, 1 direction per JVP (fwd passes) | logits MiB | peak MiB "
        "forward / sampling / linearised | extra logits sampling / linearised |",
        "|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in result["cost"]:
        lines.append(
            f"| {r['tokens']} | {r['forward_s']:.4f} | "
            f"{r['sampling_forward_passes']:.2f} | "
            f"{r['linearised_forward_passes']:.2f} | "
            f"{r['linearised_one_per_jvp_forward_passes']:.2f} | "
            f"{r['logits_mib']:.2f} | {r['forward_peak_mib']:.1f} / "
            f"{r['sampling_peak_mib']:.1f} / {r['linearised_peak_mib']:.1f} | "
            f"{r['sampling_extra_logits']:.2f} / {r['linearised_extra_logits']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = script_parser(__doc__, repeats=3)
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama")
    parser.add_argument("--n-train", type=int, help="default 16 (tiny: 24)")
    parser.add_argument("--samples", type=int, help="K (default 10; tiny 4)")
    parser.add_argument("--lengths", type=int, nargs="+", help="sequence lengths")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.set_defaults(output="benchmarks/results/generation")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = GenConfig.tiny() if args.tiny else GenConfig()
    over: dict = {"n_train": args.n_train or (cfg.n_train if args.tiny else 16)}
    for key, value in (
        ("n_samples", args.samples), ("cost_lengths", args.lengths),
        ("device", args.device),
    ):  # fmt: skip
        if value is not None:
            over[key] = value
    cfg = replace(cfg, **over)
    command = command_line("benchmarks/bench_generation_cost.py", argv)
    result = {**run(cfg, args.repeats), "command": command}
    write_results(args.output, "cost", result, to_markdown(result, command), indent=2)
    return result


if __name__ == "__main__":
    main()
