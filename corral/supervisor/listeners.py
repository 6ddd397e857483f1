"""Opening the sockets corrald listens on: TCP and unix, both later wrapped in TLS."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from pathlib import Path

import trio

from corral.address import Address, TCPAddress, UnixAddress
from corral.directories import make_directories

# Enough for a burst of clients connecting at once; the kernel caps it at somaxconn.
BACKLOG = 1024
# Only root may connect to the unix socket (see open_unix_listener).
SOCKET_MODE = 0o600


class ListenError(Exception):
    """A listener could not be opened; the message names the address and why."""


async def open_listener(address: Address) -> list[trio.SocketListener]:
    """Open the listener(s) for one address (a host name may give several)."""
    if isinstance(address, UnixAddress):
        return [await open_unix_listener(Path(address.path))]
    return await open_tcp(address)


async def open_tcp(address: TCPAddress) -> list[trio.SocketListener]:
    try:
        return await trio.open_tcp_listeners(address.port, host=address.host, backlog=BACKLOG)
    except OSError as exc:
        raise ListenError(f"cannot listen on {address}: {exc.strerror or exc}") from exc


def _clear_the_way(path: Path) -> None:
    """Make the socket's directory (0700), and remove a stale socket file
    there; ListenError for a live one, or a file that is not a socket."""
    make_directories(path.parent, 0o700)
    try:
        info = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ListenError(f"cannot listen on unix:{path}: a file that is not a socket is there")
    if _probe_live(path):
        raise ListenError(f"cannot listen on unix:{path}: another server is accepting there")
    path.unlink(missing_ok=True)


def _probe_live(path: Path) -> bool:
    """True if something accepts connections on the unix socket at `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        raise ListenError(f"cannot probe existing socket unix:{path}: {exc.strerror}") from exc
    finally:
        probe.close()
    return True


async def open_unix_listener(path: Path) -> trio.SocketListener:
    """Listen on a unix socket at `path`.

    A stale socket file left by a dead daemon is replaced; a live one, or a
    file that is not a socket, is refused. The socket's directory is created
    0700 if missing, and the socket 0600 whatever the umask (its mode is
    set on the socket before bind makes the file): only root may connect,
    as only root may read the PKI (TLS still authenticates every peer).
    """
    await trio.to_thread.run_sync(_clear_the_way, path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.fchmod(sock.fileno(), SOCKET_MODE)
        await sock.bind(os.fspath(path))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(f"cannot listen on unix:{path}: address in use") from exc
        raise ListenError(f"cannot listen on unix:{path}: {exc.strerror}") from exc
    return trio.SocketListener(sock)


def listener_address(listener: trio.SocketListener) -> Address:
    """The address a listener is bound to (with the real port for port 0)."""
    name = listener.socket.getsockname()
    if listener.socket.family == socket.AF_UNIX:
        return UnixAddress(name if isinstance(name, str) else os.fsdecode(name))
    return TCPAddress(name[0], name[1])


def remove_unix_sockets(addresses: list[Address]) -> None:
    """Remove the socket files of our unix listeners once they are closed."""
    for address in addresses:
        if isinstance(address, UnixAddress):
            path = Path(address.path)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()
