"""Both receive models behind a real QMP destination (``mignet serve --recv-model``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from mignet.bench.recv_model import Shape, run_one


@pytest.mark.parametrize("model", ["thread", "coroutine"])
def test_each_model_loads_and_refuses_option_changes_mid_load(model: str, tmp_path: Path) -> None:
    # 400 device sections (25 MiB, decoded field by field) keep the load "active" for long
    # enough that 10 ms polls see it even on a fast, quiet machine.
    run = asyncio.run(run_one(model, Shape("mixed", "64M", 400), tmp_path))
    assert run.nbytes == 64 << 20 and run.seconds > 0
    assert run.latencies, "query-migrate was answered during the load"
    # The race from upstream review: capabilities cannot change under a running load, in
    # either model — the option lock does not depend on who holds the big lock.
    assert run.set_caps_refused is True, run.set_caps_error
    stats = run.loop_stats
    assert stats["recv-model"] == model
    assert stats["bql-holds"]["count"] > 0 and stats["main-loop-stalls"]["count"] > 0
