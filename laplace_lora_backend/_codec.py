"""A nested state as a JSON tree plus a flat dict of tensors (safetensors).

`flatten` turns a state (dicts, lists, tuples, tensors, numbers, strings)
into a JSON tree in which every tensor is replaced by a reference to its key
in a flat ``{key: tensor}`` dict, which safetensors can write; `unflatten`
rebuilds the state from both. Tensors keep their memory layout (a permuted
tensor is stored contiguous with its permutation), so that results computed
from the loaded state equal the saved one's bit for bit. `atomic_write`
writes a file through a temporary one.

Generic: nothing here knows about posteriors or LoRA.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Cast",
    "NotSerialisable",
    "atomic_write",
    "flatten",
    "layout_permutation",
    "plain",
    "unflatten",
]


class NotSerialisable(TypeError):
    """A value with no JSON form (raised by `plain`)."""


def atomic_write(path: Path, write) -> None:
    """Write through a temporary file, so a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plain(value: Any) -> Any:
    """JSON value of a setting (enums by value); raises `NotSerialisable`.

    Returns
    -------
    Any
        None, a bool, number or string, or lists / dicts of them.

    Raises
    ------
    NotSerialisable
        If `value` (or an item of it) has no JSON form.
    """
    if isinstance(value, Enum):
        value = value.value
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: plain(v) for k, v in value.items()}
    raise NotSerialisable(type(value).__name__)


def flatten(obj: Any, path: list[str], tensors: dict[str, torch.Tensor]) -> Any:
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
        perm = layout_permutation(t)
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
            "__dict__": {k: flatten(v, [*path, k], tensors) for k, v in obj.items()}
        }
    if isinstance(obj, tuple):
        return {
            "__tuple__": [
                flatten(v, [*path, str(i)], tensors) for i, v in enumerate(obj)
            ]
        }
    if isinstance(obj, list):
        return [flatten(v, [*path, str(i)], tensors) for i, v in enumerate(obj)]
    try:
        return plain(obj)
    except NotSerialisable:
        raise TypeError(
            f"Cannot save state entry {'.'.join(path)!r} of type {type(obj).__name__}: "
            "only tensors, numbers, strings, lists and dicts are supported."
        ) from None


def layout_permutation(t: torch.Tensor) -> list[int] | None:
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


class Cast:
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


def unflatten(
    tree: Any, tensors: dict[str, torch.Tensor], cast: Cast, source: str
) -> Any:
    """Inverse of `flatten`.

    Parameters
    ----------
    tree : Any
        The JSON tree written by `flatten`.
    tensors : dict[str, torch.Tensor]
        The tensors it references, by key.
    cast : Cast
        Applied to every tensor (and records the keys used).
    source : str
        Name of the file `tensors` come from, for error messages.

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
        return [unflatten(v, tensors, cast, source) for v in tree]
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            key = tree["__tensor__"]
            if key not in tensors:
                raise ValueError(
                    f"Tensor {key!r} of the JSON state is missing from {source}: "
                    "the two files are from different saves."
                )
            t = cast(key, tensors[key])
            if "permute" in tree:  # restore the saved memory layout
                perm = tree["permute"]
                t = t.permute(sorted(range(len(perm)), key=perm.__getitem__))
            return t
        if "__tuple__" in tree:
            return tuple(unflatten(v, tensors, cast, source) for v in tree["__tuple__"])
        return {
            k: unflatten(v, tensors, cast, source) for k, v in tree["__dict__"].items()
        }
    return tree
