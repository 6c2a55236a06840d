"""Where the linearised next-token predictive spends its time, by operator.

SmolLM2 with LoRA r=8 on q and v and a posterior fitted on ``--n-train``
articles (as `bench_generation_cost.py`); one real sequence of ``--tokens``
tokens. Times the decoder's forward pass and the vectorised JVP of the
decoder along `K` posterior directions with ``--chunks`` directions per JVP,
then profiles one JVP of all `K` directions and reports each operator's share
of the CPU time (and the same for the plain decoder pass).

Usage::

    python benchmarks/profile_linearised.py --tokens 512 --threads 1

Writes ``profile_linearised.md`` and ``.json`` under ``--output`` (default
``benchmarks/results/generation``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

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


def best_of(fn: Callable[[], object], n: int) -> float:
    """Fastest of `n` calls (s).

    Returns
    -------
    float
    """
    return min(timed(fn, "cpu")[1] for _ in range(n))


def op_shares(fn, top: int) -> list[dict]:
    """The `top` operators by self CPU time in one profiled call of `fn`.

    Returns
    -------
    list[dict]
        ``{"op", "calls", "self_s", "share"}``.
    """
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return [
        {
            "op": e.key,
            "calls": e.count,
            "self_s": e.self_cpu_time_total / 1e6,
            "share": e.self_cpu_time_total / total,
        }
        for e in events[:top]
    ]


def run(cfg: GenConfig, tokens: int, chunks: list[int], repeats: int) -> dict:
    la, real = posterior_without_finetuning(cfg)
    x = one_sequence(real, tokens)
    split = la.decoder_head_split(x)
    deltas = la.sample(cfg.n_samples, torch.Generator().manual_seed(0)) - la.mean

    def decoder() -> None:
        with torch.no_grad():
            split.hidden_states(x)

    def jvp(c: int) -> None:
        for chunk in deltas.split(c):
            la.logits_and_jvp(x, chunk, split)

    jvp(cfg.n_samples)
    decoder_s = best_of(decoder, repeats)
    times = {c: best_of(lambda c=c: jvp(c), repeats) for c in chunks}
    return {
        "tokens": tokens,
        "K": cfg.n_samples,
        "decoder_s": decoder_s,
        "jvp_s": {str(c): t for c, t in times.items()},
        "jvp_decoder_passes": {str(c): t / decoder_s for c, t in times.items()},
        "jvp_ops": op_shares(lambda: jvp(cfg.n_samples), 12),
        "decoder_ops": op_shares(decoder, 8),
    }


def to_markdown(r: dict, command: str) -> str:
    lines = [
        f"`{command}`: SmolLM2, LoRA r=8 on q, v; {r['tokens']} tokens, K={r['K']}; "
        f"decoder forward {r['decoder_s']:.3f} s (fastest of the repeats).",
        "",
        "| directions per JVP | JVP s | decoder passes |",
        "|---:|---:|---:|",
    ]
    for c, t in r["jvp_s"].items():
        lines.append(f"| {c} | {t:.2f} | {r['jvp_decoder_passes'][c]:.1f} |")
    for key, title in (("jvp_ops", "JVP of all K"), ("decoder_ops", "decoder pass")):
        lines += [
            "",
            f"| {title}: operator | calls | self s | share |",
            "|---|---:|---:|---:|",
        ]
        for o in r[key]:
            lines.append(
                f"| {o['op']} | {o['calls']} | {o['self_s']:.3f} | {o['share']:.1%} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = script_parser(__doc__, repeats=2, threads=1)
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--chunks", type=int, nargs="+", default=[10, 5, 2])
    parser.add_argument("--n-train", type=int, default=4)
    parser.set_defaults(output="benchmarks/results/generation")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = GenConfig.tiny() if args.tiny else GenConfig()
    cfg = replace(cfg, n_train=args.n_train)
    command = command_line("benchmarks/profile_linearised.py", argv)
    result = {**run(cfg, args.tokens, args.chunks, args.repeats), "command": command}
    md = to_markdown(result, command)
    write_results(args.output, "profile_linearised", result, md, indent=2)
    return result


if __name__ == "__main__":
    main()
