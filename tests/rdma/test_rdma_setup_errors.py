"""Host-side checks (no RDMA device needed): the rdma package imports lazily, and on a host
without a device every ``rdma:`` command fails with one line that names the fix."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mignet.cli import exits

from .conftest import rdma_unavailable


def test_rdma_package_and_cli_plugin_import_without_pyverbs(subprocess_env: dict[str, str]) -> None:
    """``mignet --help`` must not pay for (or depend on) pyverbs."""
    code = ("import sys, mignet.rdma, mignet.cli.main; mignet.cli.main.build_parser(); "
            "print(any(m.startswith('pyverbs') for m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=subprocess_env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


@pytest.mark.skipif(rdma_unavailable() is None, reason="this host has an RDMA device")
@pytest.mark.parametrize("args", [["recv", "--listen", "rdma:10.9.0.1:7471"],
                                  ["send", "rdma:10.9.0.1:7471", "--size", "4M"]])
def test_no_device_is_one_line_naming_the_fix(mignet_cmd: list[str], subprocess_env: dict[str, str],
                                              args: list[str]) -> None:
    r = subprocess.run([*mignet_cmd, *args], capture_output=True, text=True, env=subprocess_env,
                       timeout=60)
    assert r.returncode == exits.SETUP
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    # without pyverbs: "need pyverbs … tools/rxe/setup.sh"; with it: "no RDMA device: …"
    assert "tools/rxe/setup.sh" in lines[0] or "no RDMA device" in lines[0], lines[0]
    assert "rdma_rxe" in lines[0] or "pyverbs" in lines[0], lines[0]


@pytest.mark.skipif(rdma_unavailable() is None, reason="this host has an RDMA device")
def test_no_device_reason_names_rxe_module_state() -> None:
    pytest.importorskip("pyverbs.device", reason="pyverbs not installed (tools/rxe/setup.sh)")
    from mignet.rdma.verbs import no_device_reason

    reason = no_device_reason()
    assert reason.startswith("no RDMA device")
    assert "rdma_rxe" in reason or "rxe" in reason
