"""The ``laplace-lora`` entry point answers ``--help`` and ``--version``
without importing the package (whose import registers with laplace-torch and
takes seconds); every command gets the full parser."""

from __future__ import annotations

import subprocess
import sys

import pytest

import laplace_lora_backend
from laplace_lora_backend import cli


def _entry(*args: str) -> subprocess.CompletedProcess:
    code = (
        "import sys, laplace_lora_cli\n"
        "try:\n"
        f"    laplace_lora_cli.main({list(args)!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('laplace_lora_backend', 'laplace', 'torch') "
        "if m in sys.modules]\n"
        "print('IMPORTED', heavy)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("args", [["--help"], ["--version"], []])
def test_help_and_version_import_nothing_heavy(args):
    proc = _entry(*args)
    assert "IMPORTED []" in proc.stdout, proc.stdout + proc.stderr
    if args == ["--version"]:
        assert f"laplace-lora {laplace_lora_backend.__version__}" in proc.stdout
    elif args == ["--help"]:
        assert "laplace-lora finetune | fit | predict | evaluate" in proc.stdout
        assert "``" not in proc.stdout  # no raw markup
    else:  # no command: argparse's usage error, exit code 2
        assert "required: command" in proc.stderr


def test_a_command_help_lists_its_options_with_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["fit", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--base-model", "--adapter", "--val-data", "--structure", "--prior"):
        assert option in out
    assert "default: kron" in out
