"""The event-loop heartbeat: what it records, and that it sees a blocked loop."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from corral.client.client import connect
from corral.supervisor.heartbeat import Heartbeat
from corral.supervisor.server import Server

from .conftest import identity, until
from .test_transport import tcp


def test_the_recent_maximum_forgets_what_left_the_window() -> None:
    beat = Heartbeat(interval=1.0, window=10.0)
    for now, lag in [(1, 0.002), (2, 0.3), (3, 0.01), (9, 0.07), (11, 0.001), (12.5, 0.004)]:
        beat.record(now, lag)
    stats = beat.statistics()
    # At 12.5 the 0.3 s lag (at 2) is more than 10 s old; 0.07 (at 9) is not.
    assert (stats["last_ms"], stats["max_recent_ms"], stats["max_ms"]) == (4, 70, 300)
    assert (stats["late"], stats["beats"]) == (2, 6)
    assert (stats["max_own_ms"], stats["late_own"]) == (300, 2)
    beat.record(25, 0.0)
    assert beat.statistics()["max_recent_ms"] == 0.0


async def test_a_blocked_event_loop_shows_in_info(
    server: Server, pki_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="corral.supervisor.heartbeat")
    await until(lambda: server.heartbeat.statistics()["beats"] >= 2)
    assert server.heartbeat.statistics()["max_ms"] < 300
    # This test shares the server's loop: blocking it here holds every task.
    time.sleep(0.5)  # the beat due within it wakes >= 0.4 s late
    await until(lambda: server.heartbeat.statistics()["max_recent_ms"] >= 400)
    async with connect(tcp(server), identity(pki_dir, "alice")) as client:
        lag = (await client.info()).raw["loop_lag"]
    assert lag["max_recent_ms"] >= 400
    assert lag["late"] >= 1
    assert "the event loop woke" in caplog.text
    assert lag["max_own_ms"] >= 400  # sleeping in the loop is not waiting for a CPU
    assert lag["late_own"] >= 1


def test_lateness_spent_waiting_for_a_cpu_is_told_apart() -> None:
    beat = Heartbeat(interval=1.0, window=10.0)
    beat.record(1, 0.2, waited=0.19)  # the host had no CPU for us: not our doing
    beat.record(2, 0.12, waited=0.01)  # we held the loop for 110 ms
    stats = beat.statistics()
    assert (stats["max_ms"], stats["late"]) == (200, 2)
    assert (stats["max_own_ms"], stats["late_own"]) == (110, 1)
