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

import importlib
import json
import os
import re
import warnings
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from laplace import Laplace
from laplace.curvature import CurvatureInterface
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parameters_to_vector

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

# backend classes are re-imported by name only from these packages
_TRUSTED_BACKEND_PACKAGES = ("laplace_lora_backend", "laplace")


class _NotSerialisable(TypeError):
    pass


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
    state_tree = _flatten(la.state_dict(), [], tensors)
    settings, omitted = _encode_settings(la.constructor_settings())
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "laplace_lora_backend_version": __version__,
        "class": type(la).__name__,
        "key": list(type(la)._key),
        "likelihood": _plain(la.likelihood),
        "n_params": la.n_params,
        "n_data": _plain(la.n_data),
        "n_outputs": _plain(la.n_outputs),
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
    _atomic_write(
        directory / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata=metadata)
    )
    text = json.dumps(config, indent=2, allow_nan=True) + "\n"
    _atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(text))


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file, so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _plain(value: Any) -> Any:
    """JSON value of a setting (enums by value); raises `_NotSerialisable`.

    Returns
    -------
    Any
        None, a bool, number or string, or lists / dicts of them.

    Raises
    ------
    _NotSerialisable
        If `value` (or an item of it) has no JSON form.
    """
    if isinstance(value, Enum):
        value = value.value
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _plain(v) for k, v in value.items()}
    raise _NotSerialisable(type(value).__name__)


def _flatten(obj: Any, path: list[str], tensors: dict[str, torch.Tensor]) -> Any:
    """JSON tree of `obj`, each tensor moved to `tensors` and referenced by key.

    Tensors are detached, copied to the CPU (no shared storage) and made
    contiguous, as safetensors requires.

    Returns
    -------
    Any
        The JSON tree: tensors as ``{"__tensor__": key}`` (with ``"permute"``
        for permuted layouts), dicts as ``{"__dict__": ...}``, tuples as
        ``{"__tuple__": [...]}``.

    Raises
    ------
    ValueError
        If two tensors map to the same key.
    TypeError
        If a dict has non-string keys, or an entry is of an unsupported type.
    """
    if isinstance(obj, torch.Tensor):
        key = ".".join(path) or "tensor"
        if key in tensors:
            raise ValueError(f"Two tensors of the state map to the key {key!r}.")
        t = obj.detach()
        perm = _layout_permutation(t)
        if perm is not None:
            t = t.permute(perm)
        tensors[key] = t.to("cpu", copy=True).contiguous()
        return (
            {"__tensor__": key}
            if perm is None
            else {"__tensor__": key, "permute": perm}
        )
    if isinstance(obj, Mapping):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"State dict at {'.'.join(path)!r} has non-string keys.")
        return {
            "__dict__": {k: _flatten(v, [*path, k], tensors) for k, v in obj.items()}
        }
    if isinstance(obj, tuple):
        return {
            "__tuple__": [
                _flatten(v, [*path, str(i)], tensors) for i, v in enumerate(obj)
            ]
        }
    if isinstance(obj, list):
        return [_flatten(v, [*path, str(i)], tensors) for i, v in enumerate(obj)]
    try:
        return _plain(obj)
    except _NotSerialisable:
        raise TypeError(
            f"Cannot save state entry {'.'.join(path)!r} of type {type(obj).__name__}: "
            "only tensors, numbers, strings, lists and dicts are supported."
        ) from None


def _layout_permutation(t: torch.Tensor) -> list[int] | None:
    """Dimension order that makes `t` contiguous, if it is a permuted dense tensor.

    LAPACK returns column-major eigenvectors (`U` of a low-rank factor has
    strides `(1, d)`). Matrix products on another layout may differ in the
    last bit, so such tensors are stored as ``t.permute(perm)`` (contiguous)
    and permuted back on load, which restores the strides.

    Returns
    -------
    list[int] or None
        The permutation; None for contiguous tensors, tensors of fewer than
        2 dimensions, or layouts that no permutation makes contiguous.
    """
    if t.dim() < 2 or t.is_contiguous():
        return None
    perm = sorted(range(t.dim()), key=lambda i: -t.stride(i))
    return perm if t.permute(perm).is_contiguous() else None


def _encode_lora_modules(value: Any) -> Any:
    if isinstance(value, re.Pattern):
        return {"regex": value.pattern, "flags": int(value.flags)}
    return _plain(value)


def _decode_lora_modules(value: Any) -> Any:
    if isinstance(value, dict):
        return re.compile(value["regex"], value["flags"])
    return value


def _encode_settings(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """JSON form of constructor settings (`LoRALaplace.constructor_settings`).

    Returns
    -------
    settings : dict[str, Any]
        The settings that can be written.
    omitted : list[str]
        Names of those that cannot (a backend class outside laplace /
        laplace_lora_backend, kwargs holding objects): they must be passed
        again to `load_posterior`.
    """
    settings: dict[str, Any] = {}
    omitted: list[str] = []
    for key, value in raw.items():
        if key == "lora_modules":
            try:
                settings[key] = _encode_lora_modules(value)
            except _NotSerialisable:
                omitted.append(key)
        elif key == "backend":
            if value.__module__.split(".")[0] in _TRUSTED_BACKEND_PACKAGES:
                settings[key] = f"{value.__module__}:{value.__qualname__}"
            else:
                omitted.append(key)
        elif key in ("backend_kwargs", "asdl_fisher_kwargs"):
            encoded = {}
            for k, v in (value or {}).items():
                try:
                    encoded[k] = _plain(v)
                except _NotSerialisable:
                    omitted.append(f"{key}.{k}")
            if encoded or key == "backend_kwargs":
                settings[key] = encoded
        else:
            settings[key] = _plain(value)
    return settings, omitted


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
    """  # noqa: DOC502 (AdapterMismatchError: raised by _check_lora_weights)
    directory = Path(directory)
    config = read_posterior_config(directory)
    settings = dict(config["settings"])
    settings["lora_modules"] = _decode_lora_modules(settings.get("lora_modules"))
    if "backend" in settings:
        settings["backend"] = _import_backend(settings["backend"])
    user_backend_kwargs = laplace_kwargs.pop("backend_kwargs", None) or {}
    settings["backend_kwargs"] = {
        **settings.get("backend_kwargs", {}),
        **user_backend_kwargs,
    }
    settings.update(laplace_kwargs)
    missing = [
        name
        for name in config["omitted"]
        if name not in laplace_kwargs
        and name.removeprefix("backend_kwargs.") not in user_backend_kwargs
    ]
    if missing:
        warnings.warn(
            f"The saved posterior in '{directory}' could not store {missing}; "
            "defaults are used. Pass them to load_posterior / from_pretrained.",
            stacklevel=2,
        )

    wrapped = as_logits_model(model, settings.get("dict_key_y", "labels"))
    found = find_lora_weights(wrapped, settings.get("lora_modules"))
    _check_lora_weights(
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

    path = directory / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (the JSON settings exist).")
    tensors = load_file(path, device="cpu")
    cast = _Cast(la._device, la._dtype)
    state = _unflatten(config["state"], tensors, cast)
    if cast.casted:
        warnings.warn(
            f"The posterior in '{directory}' was saved in {config['dtype']}; its "
            f"tensors were cast to the model's {la._dtype}. Results will not be "
            "bit-identical to the saved posterior.",
            stacklevel=2,
        )
    unused = set(tensors) - cast.used
    if unused:
        raise ValueError(
            f"{path} holds tensors that the JSON state does not reference "
            f"({sorted(unused)[:3]}...): the two files are from different saves."
        )
    la.load_state_dict(state)

    with torch.no_grad():
        current = parameters_to_vector(la.params)
    mean = la.mean.detach()
    if current.shape != mean.shape or not torch.equal(current.to(mean.dtype), mean):
        warnings.warn(
            "The model's LoRA weights differ from the mean of the saved posterior: "
            "the adapter is not the one the posterior was fitted at. Predictions "
            "use the model's weights; load the matching adapter checkpoint.",
            stacklevel=2,
        )
    return la


def _import_backend(spec: str) -> type[CurvatureInterface]:
    module_name, _, qualname = spec.partition(":")
    if module_name.split(".")[0] not in _TRUSTED_BACKEND_PACKAGES:
        raise ValueError(
            f"Saved backend {spec!r} is outside {_TRUSTED_BACKEND_PACKAGES}; pass "
            "backend=... to load_posterior."
        )
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, CurvatureInterface)):
        raise ValueError(f"Saved backend {spec!r} is not a curvature backend class.")
    return obj


class _Cast:
    """Moves loaded tensors to the model's device (and floating dtype)."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.casted = False
        self.used: set[str] = set()

    def __call__(self, key: str, t: torch.Tensor) -> torch.Tensor:
        self.used.add(key)
        if t.is_floating_point() and t.dtype != self.dtype:
            self.casted = True
            t = t.to(self.dtype)
        return t.to(self.device)


def _unflatten(tree: Any, tensors: dict[str, torch.Tensor], cast: _Cast) -> Any:
    """Inverse of `_flatten`.

    Returns
    -------
    Any
        The state, its tensors passed through `cast`.

    Raises
    ------
    ValueError
        If a referenced tensor is missing from `tensors`.
    """
    if isinstance(tree, list):
        return [_unflatten(v, tensors, cast) for v in tree]
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            key = tree["__tensor__"]
            if key not in tensors:
                raise ValueError(
                    f"Tensor {key!r} of the JSON state is missing from {WEIGHTS_NAME}: "
                    "the two files are from different saves."
                )
            t = cast(key, tensors[key])
            if "permute" in tree:  # restore the saved memory layout
                perm = tree["permute"]
                t = t.permute(sorted(range(len(perm)), key=perm.__getitem__))
            return t
        if "__tuple__" in tree:
            return tuple(_unflatten(v, tensors, cast) for v in tree["__tuple__"])
        return {k: _unflatten(v, tensors, cast) for k, v in tree["__dict__"].items()}
    return tree


def _check_lora_weights(
    expected: list[dict[str, Any]],
    found: list[tuple[str, list[int]]],
    directory: Path,
) -> None:
    """Raise `AdapterMismatchError` naming the first differing LoRA weight.

    Raises
    ------
    AdapterMismatchError
        If the names, order or shapes of `found` differ from `expected`.
    """
    exp = [(w["name"], list(w["shape"])) for w in expected]
    message = _first_mismatch(exp, found)
    if message is not None:
        raise AdapterMismatchError(
            f"Cannot load the Laplace posterior in '{directory}' on this model: "
            f"{message} (saved posterior: {len(exp)} LoRA weights, model: "
            f"{len(found)})."
        )


def _first_mismatch(
    expected: list[tuple[str, list[int]]], found: list[tuple[str, list[int]]]
) -> str | None:
    exp_names = {n for n, _ in expected}
    found_names = {n for n, _ in found}
    same_setup = (
        "Load the adapter the posterior was fitted with (same target_modules and r) "
        "into the same base model, wrapped the same way, with the same lora_modules"
    )
    for i in range(max(len(expected), len(found))):
        e = expected[i] if i < len(expected) else None
        f = found[i] if i < len(found) else None
        if e == f:
            continue
        if e is not None and e[0] not in found_names:
            return (
                f"LoRA weight '{e[0]}' (shape {tuple(e[1])}) of the saved posterior "
                "is missing from the model: its adapter lacks this target module or "
                f"names it differently. {same_setup}"
            )
        if f is not None and f[0] not in exp_names:
            return (
                f"the model has LoRA weight '{f[0]}' (shape {tuple(f[1])}) that the "
                "saved posterior does not cover. Restrict the posterior's weights "
                f"with lora_modules=..., or {same_setup[0].lower()}{same_setup[1:]}"
            )
        if e is not None and f is not None and e[0] == f[0]:
            hint = _rank_hint(e[0], e[1], f[1])
            return (
                f"LoRA weight '{e[0]}' has shape {tuple(f[1])} in the model but "
                f"{tuple(e[1])} in the saved posterior{hint}. {same_setup}"
            )
        return (
            f"the LoRA weights are in a different order: position {i} is "
            f"'{f[0] if f else None}' in the model but '{e[0] if e else None}' in "
            f"the saved posterior. {same_setup}"
        )
    return None


def _rank_hint(name: str, expected: list[int], found: list[int]) -> str:
    """`` (LoRA rank r=4 saved, r=8 in the model)`` when only `r` differs.

    Returns
    -------
    str
        The hint, or ``""``.
    """
    if len(expected) != 2 or len(found) != 2:
        return ""
    r_dim = 0 if ".lora_A." in name else 1 if ".lora_B." in name else None
    if r_dim is None or expected[1 - r_dim] != found[1 - r_dim]:
        return ""
    return f" (LoRA rank r={expected[r_dim]} saved, r={found[r_dim]} in the model)"


class PosteriorIO:
    """`save_pretrained` / `from_pretrained` of the LoRA Laplace classes."""

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
