"""`laplace-lora` command line: ``laplace-lora demo``.

The demo is, for now, a smoke run on a tiny random-init Llama with LoRA:
fit ``("lora", "kron")``, tune the prior by marginal likelihood and print the
probit predictive next to the MAP softmax.
"""

from __future__ import annotations

import argparse
import os
import time


def _tiny_demo(seed: int) -> None:
    import torch
    from laplace import Laplace
    from peft import LoraConfig, get_peft_model
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    import laplace_lora_backend  # noqa: F401  (registers "lora")

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="eager",
    )
    lm = get_peft_model(
        LlamaForCausalLM(cfg),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    )

    class LastToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = lm

        def forward(self, batch):
            out = self.lm(input_ids=batch["input_ids"], logits_to_keep=1)
            return out.logits[:, -1, :3]

    model = LastToken().eval()
    ids = torch.randint(3, 64, (32, 12))
    labels = torch.randint(0, 3, (32,))
    data = [{"input_ids": ids[i], "labels": labels[i]} for i in range(32)]
    loader = torch.utils.data.DataLoader(data, batch_size=8)

    t0 = time.perf_counter()
    la = Laplace(
        model, "classification", subset_of_weights="lora", hessian_structure="kron"
    )
    la.fit(loader, progress_bar=True)
    t_fit = time.perf_counter() - t0
    la.optimize_prior_precision(method="marglik", n_steps=50)
    batch = {"input_ids": ids[:4]}
    with torch.no_grad():
        map_probs = model(batch).softmax(-1)
    probs = la(batch, pred_type="glm", link_approx="probit")
    print(f"LoRA weights: {la.n_layers} tensors, {la.n_params} parameters")
    prior = la.prior_precision.item()
    print(f"fit: {t_fit:.2f} s; prior precision (marglik): {prior:.4g}")
    print("MAP softmax:\n", map_probs)
    print("Laplace-LoRA probit predictive:\n", probs)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``laplace-lora`` console script."""
    parser = argparse.ArgumentParser(prog="laplace-lora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fit Laplace-LoRA and predict (smoke demo)")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.command == "demo":
        _tiny_demo(args.seed)


if __name__ == "__main__":
    main()
