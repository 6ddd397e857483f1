"""`corrald`: the daemon's entry point.

Everything that must happen before trio starts happens in `main()`, in
order: parse flags, prepare and lock the state directory, choose and claim
the cgroup parent, load (or, with `--init-pki`, create) the PKI, raise the
open-file limit. Then one trio run binds the listeners, and only then
starts the job manager (which sweeps and builds sandboxes): a corrald that
refuses to start (state directory locked, parent claimed, address taken)
has touched no cgroup and no job. It serves until SIGINT or SIGTERM; see
`serve` for the order of a shutdown.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import resource
import shutil
import signal
import ssl
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import trio

import corral
from corral import pki_layout
from corral.address import Address, TCPAddress, UnixAddress, parse_address
from corral.directories import make_directories
from corral.errors import OperationError
from corral.pidlock import LockHeld, take_lock
from corral.shim.cgroup import Flavour
from corral.shim.oom import oom_score_pinned
from corral.streams import CLOSE_TIMEOUT
from corral.supervisor import certificates, preflight
from corral.supervisor.certificates import ServerCertificate
from corral.supervisor.flags import (
    DEFAULT_TCP,
    SOCKET_NAME,
    build_parser,
)
from corral.supervisor.listeners import ListenError
from corral.supervisor.preflight import (
    EXIT_UNAVAILABLE,
    LOCK_FILE,
    StartupError,
    check_uid_range,
    policy_from,
    prepare_pki,
    require_cgroups,
)
from corral.supervisor.server import (
    Server,
    ServerConfig,
)
from corral.tls import TLSConfigError
from corral.worker.admission import log_quota
from corral.worker.cgroup_parent import (
    ParentClaim,
    ParentError,
    claim_parent,
    default_parent,
    remove_if_empty,
)
from corral.worker.manager import (
    CGROUP_ROOT,
    Admission,
    JobManager,
    Retention,
    open_job_manager,
)
from corral.worker.spawner import Spawner, SpawnerError
from corral.worker.uid_pool import UidRange

if TYPE_CHECKING:
    from corral.supervisor.metrics import MetricsServer

log = logging.getLogger("corrald")

# Who stopped the jobs corrald stops as it shuts down, as their reason says.
SHUTDOWN_BY = "corrald shutting down"


def _prepare_state_dir(state_dir: Path) -> Path:
    """Create the state directory and its jobs/ (0700); return it absolute."""
    state_dir = state_dir.absolute()
    try:
        for directory in (state_dir, state_dir / "jobs"):
            make_directories(directory, 0o700)
            if not directory.is_dir():
                raise StartupError(f"state directory {directory} is not a directory")
    except OSError as exc:
        raise StartupError(f"cannot create state directory {state_dir}: {exc.strerror}") from None
    return state_dir


def _lock_state_dir(state_dir: Path) -> int:
    """Take the state directory for this corrald (an flock held while it
    lives, released by the kernel however it ends); refuse if another has it."""
    path = state_dir / LOCK_FILE
    try:
        return take_lock(path)
    except OSError as exc:
        raise StartupError(f"cannot open {path}: {exc.strerror}") from None
    except LockHeld as held:
        raise StartupError(
            f"state directory {state_dir} is in use by another corrald (pid {held.holder}); "
            "stop it first, or give this one its own --state-dir",
            EXIT_UNAVAILABLE,
        ) from None


def _claim_cgroup_parent(state_dir: Path, chosen: str | None) -> ParentClaim:
    """Claim the parent given, or the state directory's own (held until exit)."""
    try:
        return claim_parent(chosen or default_parent(state_dir))
    except ParentError as exc:
        raise StartupError(str(exc), EXIT_UNAVAILABLE) from None


def _raise_fd_limit() -> None:
    """Every connection is an fd: take the hard limit as our soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)


def _path_setting() -> str:
    """`PATH=...:$PATH ` if the `corral` next to us is not the one on PATH."""
    bin_dir = Path(sys.executable).parent
    ours = bin_dir / "corral"
    if not ours.exists() or shutil.which("corral") == str(ours):
        return ""
    return f"PATH={bin_dir}:$PATH "


def banner(server: Server, pki_dir: Path) -> str:
    """What a person starting corrald by hand wants to read."""
    listening = ", ".join(str(a) for a in server.addresses)
    parent = f" under {server.jobs.cgroup_parent}" if server.jobs is not None else ""
    lines = [
        f"corrald {corral.__version__} listening on {listening}",
        f"state {server.config.state_dir}, PKI {pki_dir}, cgroup {server.cgroup}{parent}",
    ]
    admin = pki_dir / pki_layout.CLIENTS_DIR / "admin"
    tcp = [a for a in server.addresses if isinstance(a, TCPAddress)]
    unix = [a for a in server.addresses if isinstance(a, UnixAddress)]
    address = tcp[0] if tcp else (unix[0] if unix else None)
    if admin.is_dir() and address is not None:
        lines += [
            "to talk to it as the admin, paste this in another terminal:",
            f"  export {_path_setting()}CORRAL_ADDR={address} CORRAL_IDENTITY={admin}",
        ]
    return "\n".join(lines)


async def serve(
    config: ServerConfig,
    tls: tuple[ssl.SSLContext, ServerCertificate],
    spawner: Spawner,
    pki_dir: Path,
    *,
    cgroup_parent: str,
    flavour: Flavour | None = None,
    warm: int = 1,
    keep_jobs: bool = False,
    retention: Retention | None = None,
    admission: Admission | None = None,
    uid_range: UidRange | None = None,
    metrics: TCPAddress | None = None,
) -> str | None:
    """Bind the listeners (and the metrics' address), then start the job
    manager, then serve until a signal. Returns why corrald could not start
    serving (having touched no cgroup or job), or None after a clean stop.

    Theory of operation (shutdown). With `keep_jobs` (an upgrade) the first
    SIGINT/SIGTERM says goodbye to every session at once and leaves the jobs
    running for the next corrald (their shims outlive corrald; clients
    reconnect to it). Otherwise the jobs end first and the goodbye comes
    last: stop accepting, refuse new starts, stop every job with its grace
    (a second signal kills them), give the requests that were waiting on
    them (follows, `wait`s) up to `shutdown_grace` to send their ends, which
    carry the final status, then say goodbye. A further signal exits at once.
    """
    with (
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
        trio.open_signal_receiver(signal.SIGHUP) as hangups,
    ):
        server = Server(config, tls[0])
        server.certificate = tls[1]
        try:
            await server.open_listeners()
        except ListenError as exc:
            return str(exc)
        if not oom_score_pinned():
            log.warning(
                "no CAP_SYS_RESOURCE: jobs' OOM score (1000) is not a floor, "
                "a job may lower its own (give corrald the capability to pin it)"
            )
        metrics_server: MetricsServer | None = None
        try:
            if metrics is not None:
                try:
                    metrics_server = server.enable_metrics().serve(metrics.host, metrics.port)
                except OSError as exc:
                    return f"cannot serve metrics on {metrics}: {exc.strerror or exc}"
                log.info("metrics at http://%s:%d/metrics", metrics.host, metrics_server.port)
            opening = open_job_manager(
                config.state_dir,
                spawner=spawner,
                flavour=flavour,
                cgroup_parent=cgroup_parent,
                warm=warm,
                retention=retention,
                admission=admission,
                uid_range=uid_range,
            )
            async with contextlib.AsyncExitStack() as stack:
                try:
                    jobs = await stack.enter_async_context(opening)
                except OperationError as exc:
                    return str(exc)
                server.serve_jobs(jobs)
                async with trio.open_nursery() as nursery:
                    await nursery.start(_serve_then_stop, server, nursery.cancel_scope)
                    nursery.start_soon(_reload_on_sighup, server, pki_dir, hangups)
                    nursery.start_soon(_warn_before_expiry, server)
                    print(banner(server, pki_dir), flush=True)
                    await _shut_down(server, jobs, signals, keep_jobs, nursery.cancel_scope)
        finally:
            # Closing a listener does not block; the deadline only says so.
            with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT):
                await server.close_listeners()  # if serving never began
            if metrics_server is not None:
                metrics_server.close()
    return None


async def _reload_on_sighup(server: Server, pki_dir: Path, hangups: AsyncIterator[int]) -> None:
    """On each SIGHUP, load PKI_DIR's files again and use them for the
    handshakes to come (corral.supervisor.certificates); keep the old ones,
    saying why in one line, if the new ones are wrong."""
    async for _ in hangups:
        try:
            context, certificate = await trio.to_thread.run_sync(certificates.load, pki_dir)
        except TLSConfigError as exc:
            log.warning("SIGHUP: kept the TLS files in use: %s", exc)
            continue
        server.use_tls(context, certificate)
        log.info(
            "SIGHUP: new handshakes use %s (serial %x, until %s)",
            pki_dir,
            certificate.serial,
            certificate.not_after.strftime("%Y-%m-%d %H:%M UTC"),
        )
        certificates.say_if_expiring(certificate)


async def _warn_before_expiry(server: Server) -> None:
    """Once a day, warn if the certificate in use ends within WARN_BEFORE."""
    while True:
        await trio.sleep(24 * 3600)
        if server.certificate is not None:
            certificates.say_if_expiring(server.certificate)


async def _shut_down(
    server: Server,
    jobs: JobManager,
    signals: AsyncIterator[int],
    keep_jobs: bool,
    everything: trio.CancelScope,
) -> None:
    """Wait for a signal, then shut down in the order `serve` describes."""
    name = signal.Signals(await anext(signals)).name
    log.info("%s: shutting down", name)
    if keep_jobs:
        server.shutdown()
        log.info("leaving %d running jobs to the next corrald", jobs.running())
    else:
        server.stop_accepting()
        jobs.refuse_starts("corrald is shutting down; it starts no new jobs")
        await _stop_jobs(jobs, signals, everything)
        with trio.move_on_after(server.config.shutdown_grace):
            await server.wait_requests_done()
        server.shutdown()
    async for signum in signals:
        log.warning("%s again: stopping now", signal.Signals(signum).name)
        everything.cancel()
        return


async def _stop_jobs(
    jobs: JobManager, signals: AsyncIterator[int], everything: trio.CancelScope
) -> None:
    """Stop every running job with its grace; another signal kills them now,
    one more cancels `everything`."""
    running = jobs.running()
    if not running:
        return
    log.info("stopping %d running jobs (each with its grace)", running)
    async with trio.open_nursery() as nursery:

        async def kill_on_signal() -> None:
            name = signal.Signals(await anext(signals)).name
            log.warning("%s again: killing the jobs now", name)
            nursery.start_soon(functools.partial(jobs.stop_all, by=SHUTDOWN_BY, grace=0.0))
            name = signal.Signals(await anext(signals)).name
            log.warning("%s again: stopping now", name)
            everything.cancel()

        nursery.start_soon(kill_on_signal)
        await jobs.stop_all(by=SHUTDOWN_BY)
        nursery.cancel_scope.cancel()


async def _serve_then_stop(
    server: Server,
    done: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[list[Address]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await server.serve(task_status=task_status)
    done.cancel()


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s corrald %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    if args.check:
        try:
            for line in preflight.check(args):
                print(line)
        except StartupError as exc:
            sys.stderr.write(f"corrald: error: {exc}\n")
            return exc.status
        print("corrald --check: nothing wrong; corrald would start with these flags")
        return 0
    claim: ParentClaim | None = None  # held until we exit
    try:
        state_dir = _prepare_state_dir(args.state_dir)
        _lock_state_dir(state_dir)  # its descriptor stays open until we exit
        claim = _claim_cgroup_parent(state_dir, args.cgroup_parent)
        parent = claim.parent
        pki_dir = (args.pki or state_dir / "pki").absolute()
        prepare_pki(pki_dir, create=args.init_pki, server_names=args.server_names)
        try:
            context, certificate = certificates.load(pki_dir)
        except TLSConfigError as exc:
            raise StartupError(str(exc)) from None
        certificates.say_if_expiring(certificate)
        listen = args.listen or [
            parse_address(DEFAULT_TCP),
            UnixAddress(str(state_dir / SOCKET_NAME)),
        ]
        policy = policy_from(args)
        check_uid_range(args.uid_range)
        _raise_fd_limit()
        config = ServerConfig(
            policy=policy,
            state_dir=state_dir,
            pki_dir=pki_dir,
            listen=listen,
            handshake_timeout=args.handshake_timeout,
            max_connections=args.max_connections,
            max_requests_per_connection=args.max_requests,
            max_connections_per_user=args.max_connections_per_user,
            max_streams_per_user=args.max_streams_per_user,
            io_timeout=args.io_timeout,
            idle_timeout=args.idle_timeout,
            audit_max_size=args.audit_max_size,
        )
        flavour = require_cgroups()
        # Before trio starts any thread: shims are forked from the spawner.
        try:
            spawner = Spawner.start()
        except SpawnerError as exc:
            raise StartupError(str(exc), EXIT_UNAVAILABLE) from None
        try:
            serving = functools.partial(
                serve,
                cgroup_parent=parent,
                flavour=flavour,
                warm=args.warm,
                keep_jobs=args.keep_jobs,
                retention=Retention(
                    count=args.keep_finished,
                    age=args.keep_for,
                    log_bytes=None if args.keep_log_size is None else int(args.keep_log_size),
                    total_count=args.keep_finished_total,
                    total_log_bytes=(
                        None if args.keep_log_size_total is None else int(args.keep_log_size_total)
                    ),
                ),
                admission=Admission(
                    max_jobs=args.max_jobs,
                    max_jobs_per_owner=args.max_jobs_per_user,
                    max_finished_per_owner=args.max_finished_per_user,
                    max_log_bytes_per_owner=(
                        log_quota(state_dir)
                        if args.max_log_size_per_user is None
                        else int(args.max_log_size_per_user)
                    ),
                ),
                uid_range=args.uid_range,
                metrics=args.metrics,
            )
            failure = trio.run(serving, config, (context, certificate), spawner, pki_dir)
        finally:
            spawner.close()  # its warm sandboxes are gone when it returns
        if failure is None:  # it served: the parent is ours to tidy, if nothing is left in it
            remove_if_empty(flavour, parent, CGROUP_ROOT)
    except StartupError as exc:
        sys.stderr.write(f"corrald: error: {exc}\n")
        return exc.status
    finally:
        if claim is not None:
            claim.close()
    if failure is not None:
        sys.stderr.write(f"corrald: error: {failure}\n")
        return EXIT_UNAVAILABLE
    log.info("stopped")
    return 0


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
