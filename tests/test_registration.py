"""Importing the package adds the "lora" keys and hijacks no upstream key."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json
import laplace
from laplace.baselaplace import BaseLaplace
from laplace.laplace import _all_subclasses

before = {c._key: f"{c.__module__}.{c.__qualname__}"
          for c in _all_subclasses(BaseLaplace) if hasattr(c, "_key")}
import laplace_lora_backend  # noqa: F401
classes = [c for c in _all_subclasses(BaseLaplace) if hasattr(c, "_key")]
after = {}
dupes = []
for c in classes:
    name = f"{c.__module__}.{c.__qualname__}"
    if c._key in after and after[c._key] != name:
        dupes.append([list(c._key), after[c._key], name])
    after[c._key] = name
print(json.dumps({"before": {"|".join(k): v for k, v in before.items()},
                  "after": {"|".join(k): v for k, v in after.items()},
                  "dupes": dupes}))
"""


@pytest.mark.parametrize("hashseed", ["0", "1", "random"])
def test_keys_in_fresh_interpreter(hashseed):
    """Set order varies per process: check in several fresh interpreters."""
    env = dict(os.environ, PYTHONHASHSEED=hashseed)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    res = json.loads(out.strip().splitlines()[-1])
    assert res["dupes"] == []
    for key, cls in res["before"].items():
        assert res["after"][key] == cls, f"upstream key {key} hijacked"
    for structure, cls in [
        ("kron", "LoRAKronLaplace"),
        ("diag", "LoRADiagLaplace"),
        ("full", "LoRAFullLaplace"),
    ]:
        assert res["after"][f"lora|{structure}"].endswith(cls)
