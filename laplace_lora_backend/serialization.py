"""Save a fitted LoRA Laplace posterior beside its PEFT adapter, without pickle.

`save_posterior` writes two files into a directory (which may already hold a
PEFT adapter, ``adapter_model.safetensors`` + ``adapter_config.json``; those
are never touched):

``laplace_posterior.safetensors``
    Every tensor of the posterior's `state_dict`: the curvature (dense
    Kronecker factors, low-rank factors `U` / `s` / `trace`, a diagonal or a
    full matrix), `mean`, `prior_mean`, `prior_precision`, `sigma_noise`,
    `loss`. Keys are the tensors' paths in the state, e.g. ``"H.0.1.U"``.
``laplace_posterior.json``
    Format version, class and `_key`, likelihood, the constructor settings
    needed to rebuild the object (lowrank options, `lora_modules`, `damping`,
    backend class and its JSON-serialisable kwargs, ...), the LoRA weight
    names and shapes in parameter order, and the state with each tensor
    replaced by a reference to its safetensors key (this is how nested
    structures such as the per-weight factor lists are rebuilt).

`load_posterior` reads both files without pickle (no `torch.load`), builds the
class through `laplace.Laplace(..., subset_of_weights="lora", ...)`, checks that
the model's LoRA weights have the saved names and shapes (a `ValueError`
names the first mismatch) and restores the state, so that evidence,
predictive and samples equal the saved posterior's bit for bit.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from laplace import Laplace
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parameters_to_vector

from laplace_lora_backend._adapter_check import check_lora_weights
from laplace_lora_backend._codec import Cast, atomic_write, flatten, plain, unflatten
from laplace_lora_backend._settings_codec import decode_settings, encode_settings
from laplace_lora_backend._version import __version__
from laplace_lora_backend.curvature.discovery import find_lora_weights
from laplace_lora_backend.errors import AdapterMismatchError
from laplace_lora_backend.hf_models import as_logits_model

__all__ = [
    "AdapterMismatchError",
    "PosteriorIO",
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "load_posterior",
    "read_posterior_config",
    "save_posterior",
]

WEIGHTS_NAME = "laplace_posterior.safetensors"
CONFIG_NAME = "laplace_posterior.json"
FORMAT = "laplace_lora_posterior"
FORMAT_VERSION = 1


# --------------------------------------------------------------------- save
def save_posterior(la: Any, directory: str | os.PathLike) -> None:
    """Write a fitted LoRA Laplace posterior to `directory`.

    Parameters
    ----------
    la : LoRALaplace
        A `LoRAKronLaplace` (dense or low-rank factors), `LoRADiagLaplace` or
        `LoRAFullLaplace`, usually fitted.
    directory : str or os.PathLike
        Created if missing. Other files in it (a PEFT adapter) are left alone;
        `laplace_posterior.safetensors` / `.json` are replaced.

    Raises
    ------
    TypeError
        If `la` is not a LoRA Laplace object, or its state holds something other
        than tensors, numbers, strings, lists and dicts.

    Notes
    -----
    Constructor settings that cannot be written as JSON (a backend kwarg
    holding an object, a backend class outside laplace / laplace_lora_backend)
    are listed under ``"omitted"`` in the JSON; pass them to `load_posterior`.
    """
    if not callable(getattr(la, "constructor_settings", None)):
        raise TypeError(
            f"save_posterior expects a LoRA Laplace object (subset_of_weights='lora'), "
            f"got {type(la).__name__}."
        )
    tensors: dict[str, torch.Tensor] = {}
    state_tree = flatten(la.state_dict(), [], tensors)
    settings, omitted = encode_settings(la.constructor_settings())
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "laplace_lora_backend_version": __version__,
        "class": type(la).__name__,
        "key": list(type(la)._key),
        "likelihood": plain(la.likelihood),
        "n_params": la.n_params,
        "n_data": plain(la.n_data),
        "n_outputs": plain(la.n_outputs),
        "dtype": str(la._dtype).removeprefix("torch."),
        "lora_weights": [
            {"name": w.name, "shape": list(w.param.shape)} for w in la.lora_weights
        ],
        "settings": settings,
        "omitted": omitted,
        "state": state_tree,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "laplace_lora_format_version": str(FORMAT_VERSION)}
    atomic_write(
        directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata=metadata)
    )
    text = json.dumps(config, indent=2, allow_nan=True) + "\n"
    atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(text))


# --------------------------------------------------------------------- load
def read_posterior_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The JSON settings of a saved posterior (`laplace_posterior.json`).

    Parameters
    ----------
    directory : str or os.PathLike

    Returns
    -------
    config : dict
        Keys ``"class"``, ``"key"``, ``"likelihood"``, ``"lora_weights"``,
        ``"settings"``, ``"state"``, ...

    Raises
    ------
    FileNotFoundError
        If the directory holds no saved posterior.
    ValueError
        If the file is not a posterior of a format version this code reads.
    """
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"No Laplace posterior in '{directory}' ({CONFIG_NAME} is missing). "
            "Save one with `la.save_pretrained(directory)`."
        )
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{path} is not a laplace_lora_backend posterior file.")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {config.get('format_version')}; this "
            f"laplace_lora_backend reads version {FORMAT_VERSION}. Upgrade "
            "laplace_lora_backend."
        )
    return config


def load_posterior(
    directory: str | os.PathLike, model: nn.Module, **laplace_kwargs: Any
) -> Any:
    """Rebuild a posterior saved by `save_posterior` on `model`.

    Parameters
    ----------
    directory : str or os.PathLike
        Holds `laplace_posterior.safetensors` and `laplace_posterior.json`.
    model : torch.nn.Module
        The model with the adapter the posterior was fitted with (e.g. a fresh
        base model with `PeftModel.from_pretrained(base, directory)`), wrapped
        the same way as when fitting.
    **laplace_kwargs
        Override saved constructor settings (e.g. `backend`, `backend_kwargs`,
        `dict_key_x`) or supply those the JSON lists as ``"omitted"``.

    Returns
    -------
    la : LoRALaplace
        `LoRAKronLaplace`, `LoRADiagLaplace` or `LoRAFullLaplace`, on the
        model's device and dtype. Floating tensors saved in another dtype
        are cast (with a warning).

    Raises
    ------
    AdapterMismatchError
        (a `ValueError`) If the model's LoRA weights differ from the saved ones
        in names, order or shapes; the message names the first mismatch.
    FileNotFoundError
        If a posterior file is missing.
    ValueError
        If the JSON is not a posterior of the format version this code reads,
        the saved settings build another class than the saved one, or the
        weights file holds tensors the JSON state does not reference.

    Warns
    -----
    UserWarning
        If the model's LoRA weights are not the saved posterior mean (another
        adapter checkpoint with the same shapes), or settings are missing.
    """  # noqa: DOC502 (AdapterMismatchError: raised by check_lora_weights)
    directory = Path(directory)
    config = read_posterior_config(directory)
    settings = decode_settings(config, laplace_kwargs, directory)
    la = _build_posterior(model, config, settings, directory)
    _restore_state(la, config, directory)
    _warn_if_not_at_mean(la)
    return la


def _build_posterior(
    model: nn.Module, config: dict[str, Any], settings: dict[str, Any], directory: Path
) -> Any:
    """Check the model's adapter, then build the saved class, unfitted.

    Returns
    -------
    LoRALaplace
        Built by `laplace.Laplace` from the saved key and `settings`.

    Raises
    ------
    ValueError
        If the settings build another class than the saved one.
    """
    wrapped = as_logits_model(model, settings.get("dict_key_y", "labels"))
    found = find_lora_weights(
        wrapped, settings.get("lora_modules"), settings.get("modules_to_save")
    )
    check_lora_weights(
        config["lora_weights"],
        [(w.name, list(w.param.shape)) for w in found],
        directory,
    )

    subset, structure = config["key"]
    la = Laplace(
        model,
        config["likelihood"],
        subset_of_weights=subset,
        hessian_structure=structure,
        **settings,
    )
    if type(la).__name__ != config["class"]:
        raise ValueError(
            f"'{directory}' holds a {config['class']} posterior but "
            f"Laplace(subset_of_weights={subset!r}, hessian_structure={structure!r}) "
            f"built a {type(la).__name__}. Import the module defining "
            f"{config['class']} before loading."
        )
    return la


def _restore_state(la: Any, config: dict[str, Any], directory: Path) -> None:
    """Load the saved tensors into `la` (cast to its device and dtype).

    Raises
    ------
    FileNotFoundError
        If the weights file is missing.
    ValueError
        If it holds tensors the JSON state does not reference.
    """
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (the JSON settings exist).")
    tensors = load_file(path, device="cpu")
    cast = Cast(la._device, la._dtype)
    state = unflatten(config["state"], tensors, cast, WEIGHTS_NAME)
    if cast.casted:
        warnings.warn(
            f"The posterior in '{directory}' was saved in {config['dtype']}; its "
            f"tensors were cast to the model's {la._dtype}. Results will not be "
            "bit-identical to the saved posterior.",
            stacklevel=3,
        )
    unused = set(tensors) - cast.used
    if unused:
        raise ValueError(
            f"{path} holds tensors that the JSON state does not reference "
            f"({sorted(unused)[:3]}...): the two files are from different saves."
        )
    la.load_state_dict(state)


def _warn_if_not_at_mean(la: Any) -> None:
    """Warn if the model's LoRA weights are not the posterior mean."""
    with torch.no_grad():
        current = parameters_to_vector(la.params)
    mean = la.mean.detach()
    if current.shape != mean.shape or not torch.equal(current.to(mean.dtype), mean):
        warnings.warn(
            "The model's LoRA weights differ from the mean of the saved posterior: "
            "the adapter is not the one the posterior was fitted at. Predictions "
            "use the model's weights; load the matching adapter checkpoint.",
            stacklevel=3,
        )


class PosteriorIO:
    """`save_pretrained` / `from_pretrained` of the LoRA Laplace classes."""

    def constructor_settings(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this object (saved with the posterior).

        Returns
        -------
        dict[str, Any]
            Constructor keyword arguments; the `backend_kwargs` without those
            the constructor derives from the other settings.
        """
        backend_kwargs = dict(self._backend_kwargs)
        if self._uses_lora_backend:  # set by the constructor from the below
            for key in ("lora_modules", "modules_to_save", *self._lora_options()):
                backend_kwargs.pop(key, None)
        return {
            "temperature": self.temperature,
            "enable_backprop": self.enable_backprop,
            "dict_key_x": self.dict_key_x,
            "dict_key_y": self.dict_key_y,
            "center_logits": self.center_logits,
            "lora_modules": self.lora_modules,
            "modules_to_save": self.modules_to_save,
            **self._lora_options(),
            "backend": self._backend_cls,
            "backend_kwargs": backend_kwargs,
            "asdl_fisher_kwargs": self._asdl_fisher_kwargs,
        }

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Save the posterior into `directory`, e.g. beside a PEFT adapter.

        Writes ``laplace_posterior.safetensors`` and ``laplace_posterior.json``
        (see `laplace_lora_backend.serialization.save_posterior`); other files
        (``adapter_model.safetensors``, ``adapter_config.json``) are untouched.
        """
        save_posterior(self, directory)

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, model: torch.nn.Module, **kwargs: Any
    ) -> Any:
        """Load a posterior saved by `save_pretrained` onto `model`.

        Parameters
        ----------
        directory : str or os.PathLike
        model : torch.nn.Module
            Model with the adapter the posterior was fitted with.
        **kwargs
            Override saved constructor settings (`backend`, ...); see
            `laplace_lora_backend.serialization.load_posterior`.

        Returns
        -------
        LoRALaplace
            The saved structure's class (`LoRAKronLaplace`, ...).

        Raises
        ------
        ValueError
            If the saved posterior has another structure than `cls`, or the
            model's LoRA weight names / shapes differ (the first is named).
        """
        saved = read_posterior_config(directory)
        key = getattr(cls, "_key", None)
        if key is not None and tuple(saved["key"]) != tuple(key):
            raise ValueError(
                f"'{directory}' holds a {saved['class']} posterior "
                f"(hessian_structure={saved['key'][1]!r}), not a {cls.__name__}. "
                f"Use {saved['class']}.from_pretrained or LoRALaplace.from_pretrained."
            )
        return load_posterior(directory, model, **kwargs)
