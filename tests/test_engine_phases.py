"""The engine thread's host time per step phase (engine.PhaseTimes) and the engine process's busy-period log line."""
from __future__ import annotations

import logging
import re
import time

import pytest

from jaxserve.engine import PhaseTimes
from jaxserve.mp_engine import _EngineLoop


def test_phase_times_accumulate_per_phase():
    ph = PhaseTimes()
    for _ in range(3):
        with ph("schedule"):
            time.sleep(0.01)
    with ph("prepare"):
        pass
    ph.add("send", 0.25)
    ph.add("send", 0.5)
    assert set(ph.seconds) == {"schedule", "prepare", "send"}
    assert 0.03 <= ph.seconds["schedule"] < 0.5 and ph.seconds["prepare"] < 0.01
    assert ph.seconds["send"] == pytest.approx(0.75)
    with pytest.raises(ZeroDivisionError):  # an exception inside still closes the phase and counts its time
        with ph("schedule"):
            1 / 0
    assert ph.seconds["schedule"] >= 0.03


class _Engine:
    def __init__(self):
        self.phases = PhaseTimes()
        self.stats_counters = {"generation_tokens_total": 0}


def _loop_in_busy_period(wall_s: float, steps: int, tokens: int, before: dict, after: dict) -> _EngineLoop:
    eng = _Engine()
    loop = _EngineLoop(eng, None, None)
    loop.busy_since = time.perf_counter() - wall_s
    loop.busy_steps, loop.busy_start, loop.busy_tokens = steps, before, 100
    eng.phases.seconds = after
    eng.stats_counters["generation_tokens_total"] = 100 + tokens
    return loop


def test_busy_period_line_reports_ms_per_step_by_phase(caplog):
    # 400 steps over ~4 s; the period's own phase seconds are after minus before: step 3.2 s -> 8.00 ms a step,
    # wait_tokens 2.0 s -> 5.00 ms, send 0.2 s -> 0.50 ms; 20,000 tokens -> ~5,000 tok/s
    loop = _loop_in_busy_period(4.0, 400, 20000, before={"step": 1.0, "wait_tokens": 0.5},
                                after={"step": 4.2, "wait_tokens": 2.5, "send": 0.2})
    with caplog.at_level(logging.INFO, logger="jaxserve"):
        loop._end_busy_period()
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("busy ")]
    assert "400 steps" in line and "20000 output tokens" in line
    assert "step 8.00" in line and "wait_tokens 5.00" in line and "send 0.50" in line
    tok_s = float(re.search(r"\((\d+) tok/s\)", line).group(1))
    assert 4500 < tok_s <= 5000
    assert loop.busy_since is None
    caplog.clear()
    loop._end_busy_period()  # no period open: nothing logged
    assert not caplog.records


def test_short_busy_periods_are_not_logged(caplog):
    loop = _loop_in_busy_period(0.5, 40, 100, before={}, after={"step": 0.4})
    with caplog.at_level(logging.INFO, logger="jaxserve"):
        loop._end_busy_period()
    assert not [r for r in caplog.records if r.getMessage().startswith("busy ")]
    assert loop.busy_since is None
