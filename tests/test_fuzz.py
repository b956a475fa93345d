"""A bounded fuzzing pass in every test run (``tools/fuzz.py``): each parser of peer input
— the decoder with the VM-description walker, the real loader on a real socket, the
device-tail splitter, the multifd records, the QMP framer — fails only with mignet's own
errors. Coverage-guided (atheris) where installed, hypothesis otherwise; longer runs are
``python tools/fuzz.py TARGET -- -max_total_time=S``."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
FUZZ = ROOT / "tools" / "fuzz.py"


def _fuzz_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mignet_fuzz_tool", FUZZ)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_bounded_pass_over_every_target_finds_nothing(subprocess_env: dict[str, str]) -> None:
    r = subprocess.run([sys.executable, str(FUZZ), "all", "--runs", "1500"], capture_output=True,
                       text=True, env=subprocess_env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    verdicts = [line for line in r.stdout.splitlines() if line.startswith("fuzz ")]
    assert len(verdicts) == 5 and all(line.endswith("no finding") for line in verdicts), r.stdout


@pytest.mark.parametrize("engine", ["hypothesis", "atheris"])
def test_a_finding_is_reported(engine: str, tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    """The harness can fail: a parser that raises something else than MignetError on some
    input is a finding (exit 1), shown with the exception."""
    fuzz = _fuzz_module()
    if engine == "atheris" and not fuzz.have_atheris():
        pytest.skip("atheris is not installed here (hypothesis covers this machine)")
    if engine == "hypothesis":
        def broken(data: bytes) -> None:
            if len(data) > 3:
                raise IndexError("planted")
        fuzz.TARGETS["qmp"] = broken
        assert fuzz.run_hypothesis("qmp", 50, None) == 1
        return
    # atheris runs the target in a child process: plant the bug in a copy of the tool
    broken_tool = tmp_path / "fuzz.py"
    broken_tool.write_text(FUZZ.read_text().replace(
        "def t_multifd(data: bytes) -> None:\n",
        "def t_multifd(data: bytes) -> None:\n    if len(data) > 3:\n        raise IndexError('planted')\n"))
    env = dict(subprocess_env, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(broken_tool), "multifd", "--runs", "50"], capture_output=True,
                       text=True, env=env, timeout=300, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "FINDING" in r.stdout and "IndexError: planted" in out, out[-3000:]
