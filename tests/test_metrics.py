"""`corrald --metrics`: a real corrald scraped over HTTP, before and after a
job, its answer parsed with prometheus_client's own parser."""

from __future__ import annotations

import os
import re
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from corral import pki_layout
from corral.client.client import connect
from corral.client.errors import AuthenticationError

from .conftest import Daemon, identity, running_corrald, start_corrald, until_async

pytestmark = [pytest.mark.jobs, pytest.mark.skipif(os.geteuid() != 0, reason="jobs need root")]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def daemon(pki_dir: Path, short_dir: Path) -> Iterator[tuple[Daemon, str]]:
    """A corrald with metrics on a free loopback port, and their URL."""
    with running_corrald(pki_dir, short_dir, "--metrics", "127.0.0.1:0") as corrald:
        said = re.search(r"metrics at (http://\S+)", corrald.log.read_text())
        assert said is not None, corrald.log.read_text()
        yield corrald, said.group(1)


def fetch(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.headers["Content-Type"], response.read().decode()


async def scrape(url: str) -> Samples:
    status, kind, body = await trio.to_thread.run_sync(fetch, url)
    assert status == 200
    assert kind.startswith("text/plain; version=0.0.4")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_a_scrape_before_and_after_a_job(daemon: tuple[Daemon, str], pki_dir: Path) -> None:
    corrald, url = daemon
    before = await scrape(url)
    context = ssl.create_default_context(cafile=pki_dir / pki_layout.CA_CERT_FILE)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    with pytest.raises(AuthenticationError):
        async with connect(corrald.tcp, context):
            pass
    async with connect(corrald.tcp, identity(pki_dir, "alice")) as alice:
        job = await alice.start(["echo", "hello"])
        assert (await alice.wait(job.id)).exit_code == 0
        async with alice.logs(job.id) as stream:
            async for _ in stream:
                pass
        with pytest.raises(Exception, match="only an admin"):
            await alice.start(["true"], user="root")
        during = await scrape(url)
    # corrald ends alice's session once it sees her connection close: in its
    # own time, which only the gauge tells.
    after = await until_async(
        lambda: scrape(url), lambda scraped: value(scraped, "corral_sessions_open") == 0
    )

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("corral_jobs_started_total") == 1
    assert grew("corral_jobs_ended_total", outcome="exited") == 1
    assert grew("corral_start_seconds_count") == 1
    assert 0 < grew("corral_start_seconds_sum") < 60
    assert grew("corral_requests_total", op="start", outcome="ok") == 1
    assert grew("corral_admission_refusals_total", code="permission_denied") == 1
    assert grew("corral_handshakes_refused_total", reason="no_certificate") == 1
    assert grew("corral_output_bytes_total") > len(b"hello\n")  # the log's records
    assert value(during, "corral_sessions_open") == 1
    assert value(after, "corral_sessions_open") == 0
    assert value(after, "corral_jobs_running") == 0
    assert value(after, "corral_audit_entries_dropped_total") == 0
    assert value(after, "corral_spawner_restarts_total") == 0
    assert value(after, "corral_loop_lateness_seconds", window="last") >= 0
    # No label carries a job's id or a user's name: the series stay few.
    labels = {v for (_, pairs) in after for (_, v) in pairs}
    assert job.id not in labels
    assert "alice" not in labels


async def test_only_metrics_are_served(daemon: tuple[Daemon, str]) -> None:
    _, url = daemon
    with pytest.raises(urllib.error.HTTPError) as caught:
        await trio.to_thread.run_sync(fetch, url.replace("/metrics", "/nothing"))
    assert caught.value.code == 404


def test_a_metrics_address_in_use_is_refused_at_start(pki_dir: Path, short_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = start_corrald(
            "--state-dir", str(short_dir / "state"), "--pki", str(pki_dir),
            "--listen", "127.0.0.1:0", "--metrics", f"127.0.0.1:{port}",
        )  # fmt: skip
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 69, stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in stderr
