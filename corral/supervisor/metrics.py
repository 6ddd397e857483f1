"""corrald's metrics in the Prometheus text format, with prometheus_client.

`corrald --metrics HOST:PORT` serves `/metrics` there (off by default;
plain HTTP, so keep it on loopback or behind what guards your scrapes).
No metric has a per-job or per-user label: their number stays fixed
whatever the load.

Two kinds of sources. What happens once, as it happens (a start's
latency, bytes streamed, a request's outcome), is counted here, from
what the sessions report (`Metrics` is a `corral.supervisor.session.Observer`).
What the server and the job manager already count (sessions open, jobs
running and ended, refused handshakes, spawner restarts, the audit
trail's losses, the event loop's lateness) is read at scrape time by a
collector, from prometheus_client's HTTP thread: only counts and lengths,
each read once, copied before use.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import trio
from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from corral.protocol import End, Error, Result
from corral.supervisor.session import RequestContext, Session, Traffic

# A start is ~10 ms warm and ~50 ms cold here; seconds mean trouble.
START_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Start refusals by admission (the rest of a start's errors are the request's).
ADMISSION_CODES = frozenset({"resource_exhausted", "permission_denied", "unavailable"})


@dataclass(frozen=True, slots=True)
class Sources:
    """What the collector reads at scrape time, each a function of no
    arguments returning a plain value or a copy."""

    sessions: Callable[[], int]
    jobs_running: Callable[[], int]
    jobs_ended: Callable[[], dict[str, int]]
    handshakes_refused: Callable[[], dict[str, int]]
    spawner_restarts: Callable[[], int]
    audit_dropped: Callable[[], int]
    loop_lag: Callable[[], dict[str, Any]]


class Metrics:
    """The registry `/metrics` serves, and the counters sessions feed."""

    def __init__(self, sources: Sources) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.start_seconds = Histogram(
            "corral_start_seconds",
            "Time from a start request to its reply, for starts that made a running job",
            buckets=START_BUCKETS,
            registry=self.registry,
        )
        self.jobs_started = Counter("corral_jobs_started", "Jobs started", registry=self.registry)
        self.admission_refusals = Counter(
            "corral_admission_refusals",
            "Starts refused before a job was made, by error code",
            ["code"],
            registry=self.registry,
        )
        self.output_bytes = Counter(
            "corral_output_bytes",
            "Bytes of job output served (logs, attach)",
            registry=self.registry,
        )
        self.input_bytes = Counter(
            "corral_input_bytes", "Bytes of input received for jobs", registry=self.registry
        )
        self.requests = Counter(
            "corral_requests",
            "Requests answered, by operation and outcome (ok or the error code)",
            ["op", "outcome"],
            registry=self.registry,
        )
        self.registry.register(_Read(sources))
        self._began: dict[tuple[int, int], float] = {}

    # -- what sessions report (corral.supervisor.session.Observer) ------------

    def said_hello(self, session: Session) -> None:
        pass

    def request_began(self, context: RequestContext) -> None:
        if context.request.op == "start":
            self._began[_key(context)] = trio.current_time()

    def request_ended(
        self, context: RequestContext, reply: Result | End | Error, traffic: Traffic
    ) -> None:
        op = context.request.op
        outcome = str(reply.code) if isinstance(reply, Error) else "ok"
        began = self._began.pop(_key(context), None)
        self.requests.labels(op=op, outcome=outcome).inc()
        self.output_bytes.inc(traffic.sent)
        self.input_bytes.inc(traffic.received)
        if op != "start":
            return
        if outcome == "ok":
            self.jobs_started.inc()
            if began is not None:
                self.start_seconds.observe(trio.current_time() - began)
        elif refused_before_a_job(reply):
            self.admission_refusals.labels(code=outcome).inc()

    # -- serving ------------------------------------------------------------

    def serve(self, host: str, port: int) -> MetricsServer:
        """Serve /metrics on host:port (and nothing else: 404) from a thread
        of its own, with prometheus_client's WSGI app and threading server;
        OSError if the address cannot be bound."""
        app = make_wsgi_app(self.registry)

        def only_metrics(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
            if environ.get("PATH_INFO") != "/metrics":
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                return [b"corrald serves /metrics only\n"]
            return app(environ, start_response)  # type: ignore[no-any-return]

        server_class = _IPv6Server if ":" in host else ThreadingWSGIServer
        server = make_server(host, port, only_metrics, server_class, handler_class=_Quiet)
        thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
        thread.start()
        return MetricsServer(server, thread)


@dataclass(frozen=True, slots=True)
class MetricsServer:
    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class _IPv6Server(ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _Quiet(WSGIRequestHandler):
    """No line on stderr per scrape: corrald's log is its own."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def refused_before_a_job(reply: Result | End | Error) -> bool:
    """Whether a start's reply refuses it before any job was made (a start
    that failed later names its job in the error's details)."""
    return (
        isinstance(reply, Error)
        and str(reply.code) in ADMISSION_CODES
        and not (reply.details or {}).get("job")
    )


def _key(context: RequestContext) -> tuple[int, int]:
    return id(context.session), context.request.id


class _Read(Collector):
    """The metrics read from their sources at every scrape."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        sources = self.sources
        yield GaugeMetricFamily(
            "corral_sessions_open", "Client sessions open", value=sources.sessions()
        )
        yield GaugeMetricFamily(
            "corral_jobs_running", "Jobs starting or running", value=sources.jobs_running()
        )
        ended = CounterMetricFamily(
            "corral_jobs_ended",
            "Jobs whose end was recorded, by outcome (exited, stopped, oom, failed, lost)",
            labels=["outcome"],
        )
        for outcome, count in sorted(sources.jobs_ended().items()):
            ended.add_metric([outcome], count)
        yield ended
        refused = CounterMetricFamily(
            "corral_handshakes_refused",
            "Peers refused in the TLS handshake (or too slow to finish it), by reason",
            labels=["reason"],
        )
        for reason, count in sorted(sources.handshakes_refused().items()):
            refused.add_metric([reason], count)
        yield refused
        yield CounterMetricFamily(
            "corral_spawner_restarts",
            "Times the spawner was replaced after it died or hung",
            value=sources.spawner_restarts(),
        )
        yield CounterMetricFamily(
            "corral_audit_entries_dropped",
            "Audit entries not written (queue full, or the disk refused them)",
            value=sources.audit_dropped(),
        )
        lag = sources.loop_lag()
        lateness = GaugeMetricFamily(
            "corral_loop_lateness_seconds",
            "How late corrald's event loop woke: the last beat, and the most in the last minute",
            labels=["window"],
        )
        lateness.add_metric(["last"], float(lag.get("last_ms", 0.0)) / 1000)
        lateness.add_metric(["recent_max"], float(lag.get("max_recent_ms", 0.0)) / 1000)
        yield lateness


__all__ = ["Metrics", "MetricsServer", "Sources"]
