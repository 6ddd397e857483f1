"""The uid pool: one uid per running job, round the range, whole again after use."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from corral.errors import OperationError
from corral.protocol import ErrorCode
from corral.worker import uid_pool
from corral.worker.uid_pool import DEFAULT_COUNT, DEFAULT_START, UidPool, UidRange, UidRangeError


def test_uids_go_round_the_range_so_a_freed_one_is_given_last() -> None:
    pool = UidPool(UidRange(5000, 3))
    first, second = pool.allocate(), pool.allocate()
    pool.release(first)
    assert (first, second, pool.allocate()) == (5000, 5001, 5002)
    assert pool.allocate() == 5000  # round again: the only one free
    with pytest.raises(OperationError) as refused:
        pool.allocate()
    assert refused.value.code is ErrorCode.RESOURCE_EXHAUSTED
    assert "widen --uid-range" in str(refused.value)


def test_after_a_thousand_jobs_the_pool_is_whole_again() -> None:
    pool = UidPool(UidRange(100_000, 64))
    rng = random.Random(17)
    running: list[int] = []
    for _ in range(1000):
        if running and (len(running) == 64 or rng.random() < 0.45):
            pool.release(running.pop(rng.randrange(len(running))))
        else:
            uid = pool.allocate()
            assert uid not in running  # never two running jobs on one uid
            running.append(uid)
    for uid in running:
        pool.release(uid)
    assert pool.held == 0
    assert sorted(pool.allocate() for _ in range(64)) == list(range(100_000, 100_064))


def test_a_restart_holds_the_uids_of_the_jobs_it_adopts() -> None:
    pool = UidPool(UidRange(7000, 3))
    assert pool.hold(7001)
    assert not pool.hold(7001)  # another's: not counted twice
    assert not pool.hold(9)  # outside the range: nothing to hold
    assert {pool.allocate(), pool.allocate()} == {7000, 7002}
    pool.release(None)  # a job with no pool uid
    assert pool.held == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1000", "must be START:COUNT"),
        ("a:5", "must be START:COUNT"),
        ("100:0", "at least one uid"),
        ("0:10", "0 is root"),
        ("4294967290:10", "must lie within"),
        ("65530:10", "65534"),
    ],
)
def test_a_bad_range_is_refused(text: str, message: str) -> None:
    with pytest.raises(UidRangeError, match=message):
        UidRange.parse(text)


def test_the_default_range_holds_nothing_the_host_lists() -> None:
    assert UidRange.parse(f"{DEFAULT_START}:{DEFAULT_COUNT}") == UidRange()
    assert list(UidRange().collisions()) == []
    assert UidRange().end - 1 < 2**31  # no tool reads its uids as negative


def test_a_range_over_host_users_and_subordinate_ids_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    subuid = tmp_path / "subuid"
    subuid.write_text("alice:100000:65536\n# a comment\n")
    monkeypatch.setattr(uid_pool, "SUBORDINATE_FILES", (subuid,))
    assert list(UidRange(0xFFFF0000, 10).collisions()) == []
    assert list(UidRange(165535, 10).collisions()) == [f"alice's ids 100000:65536 in {subuid}"]
    found = list(UidRange(1, 10).collisions())  # root's neighbours: daemon, bin, ...
    assert any(item.startswith("user ") for item in found)
    assert any(item.startswith("group ") for item in found)
