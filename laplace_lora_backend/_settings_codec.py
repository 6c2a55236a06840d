"""Constructor settings of a LoRA Laplace posterior as JSON, and back.

`encode_settings` writes what `PosteriorIO.constructor_settings` returns as
JSON values: enums by value, a `lora_modules` regex as its pattern and flags,
the backend class by its import path (only for classes of laplace /
laplace_lora_backend, which are the only ones re-imported on load). Settings
with no JSON form are listed as omitted. `decode_settings` inverts this and
merges the caller's overrides.
"""

from __future__ import annotations

import importlib
import re
import warnings
from pathlib import Path
from typing import Any

from laplace.curvature import CurvatureInterface

from laplace_lora_backend._codec import NotSerialisable, plain

__all__ = ["TRUSTED_BACKEND_PACKAGES", "decode_settings", "encode_settings"]

# backend classes are re-imported by name only from these packages
TRUSTED_BACKEND_PACKAGES = ("laplace_lora_backend", "laplace")


def _encode_lora_modules(value: Any) -> Any:
    if isinstance(value, re.Pattern):
        return {"regex": value.pattern, "flags": int(value.flags)}
    return plain(value)


def _decode_lora_modules(value: Any) -> Any:
    if isinstance(value, dict):
        return re.compile(value["regex"], value["flags"])
    return value


def encode_settings(raw: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """JSON form of constructor settings (`PosteriorIO.constructor_settings`).

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
            except NotSerialisable:
                omitted.append(key)
        elif key == "backend":
            if value.__module__.split(".")[0] in TRUSTED_BACKEND_PACKAGES:
                settings[key] = f"{value.__module__}:{value.__qualname__}"
            else:
                omitted.append(key)
        elif key in ("backend_kwargs", "asdl_fisher_kwargs"):
            encoded = {}
            for k, v in (value or {}).items():
                try:
                    encoded[k] = plain(v)
                except NotSerialisable:
                    omitted.append(f"{key}.{k}")
            if encoded or key == "backend_kwargs":
                settings[key] = encoded
        else:
            settings[key] = plain(value)
    return settings, omitted


def decode_settings(
    config: dict[str, Any], laplace_kwargs: dict[str, Any], directory: Path
) -> dict[str, Any]:
    """Constructor settings of a saved posterior, with the caller's overrides.

    Parameters
    ----------
    config : dict[str, Any]
        The posterior's JSON (`read_posterior_config`).
    laplace_kwargs : dict[str, Any]
        Overrides; ``backend_kwargs`` are merged into the saved ones.
    directory : pathlib.Path
        The posterior's directory, for messages.

    Returns
    -------
    dict[str, Any]
        Keyword arguments for `laplace.Laplace`.

    Warns
    -----
    UserWarning
        If settings the save could not store are not given in `laplace_kwargs`.
    """
    settings = dict(config["settings"])
    settings["lora_modules"] = _decode_lora_modules(settings.get("lora_modules"))
    # saved before heads could join the posterior: the LoRA weights only
    settings.setdefault("modules_to_save", False)
    if "backend" in settings:
        settings["backend"] = _import_backend(settings["backend"])
    laplace_kwargs = dict(laplace_kwargs)
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
            stacklevel=3,
        )
    return settings


def _import_backend(spec: str) -> type[CurvatureInterface]:
    module_name, _, qualname = spec.partition(":")
    if module_name.split(".")[0] not in TRUSTED_BACKEND_PACKAGES:
        raise ValueError(
            f"Saved backend {spec!r} is outside {TRUSTED_BACKEND_PACKAGES}; pass "
            "backend=... to load_posterior."
        )
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, CurvatureInterface)):
        raise ValueError(f"Saved backend {spec!r} is not a curvature backend class.")
    return obj
