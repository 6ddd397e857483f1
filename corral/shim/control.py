"""shim.sock: the shim's control socket, where corrald asks for the job's
status, stops it, resizes its terminal and attaches to its input (the
`control` channel of corral.ipc and corral.ipc_input).

A SOCK_SEQPACKET unix socket in the job's directory, so a restarted
corrald finds the shim again. Each datagram is one message and gets one
answer; corrald opens with a Hello, which is answered with the version
this shim speaks, whatever version was asked for: the newer side decides.
A connection that asks AttachInput and is taken is no longer served here:
it carries the job's input (`input_relay`).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable
from pathlib import Path

from corral import ipc, ipc_input
from corral.shim.loop import Loop
from corral.store import SOCKET_FILE, socket_path

# corrald asks for little at once (status, stop, resize); more clients
# than this at a time is a bug or an attack, and they wait for their turn.
# (Attached connections are the input relay's, and counted there.)
MAX_CONTROL_CLIENTS = 32

# What corrald asks here, besides Hello and AttachInput, and the answers.
Request = ipc.StatusRequest | ipc.StopRequest | ipc_input.Resize
Reply = ipc.StatusReply | ipc.Stopping | ipc.Refusal | ipc_input.Resized
Answer = Callable[[Request], Reply]
# Takes a connection that asked AttachInput over (None), or says why not.
Attach = Callable[[socket.socket], ipc.Refusal | None]
REQUESTS = (ipc.Hello, ipc.StatusRequest, ipc.StopRequest, ipc_input.Resize, ipc_input.AttachInput)


class ControlSocket:
    """shim.sock, bound and served from the shim's poll loop.

    `answer` turns each request into its reply, and `attach` takes a
    connection that asks AttachInput over or refuses it; neither may raise.
    """

    def __init__(self, job_dir: Path, loop: Loop, answer: Answer, attach: Attach) -> None:
        self.job_dir = job_dir
        self._loop = loop
        self._answer = answer
        self._attach = attach
        self._clients: set[socket.socket] = set()
        path = job_dir / SOCKET_FILE
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a socket left by a shim that died
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        with socket_path(job_dir) as address:
            self._listener.bind(address)
        os.chmod(path, 0o600)
        self._listener.listen(MAX_CONTROL_CLIENTS)
        self._listener.setblocking(False)
        loop.watch(self._listener.fileno(), self._accept)

    def remove(self) -> None:
        """Take shim.sock away: a corrald that looks from now on finds no shim."""
        with contextlib.suppress(FileNotFoundError):
            (self.job_dir / SOCKET_FILE).unlink()

    def _accept(self, fd: int) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        if len(self._clients) >= MAX_CONTROL_CLIENTS:
            client.close()
            return
        client.setblocking(False)
        self._take(client)

    def _take(self, client: socket.socket) -> None:
        self._clients.add(client)
        self._loop.watch(client.fileno(), lambda _fd: self._serve(client))

    def _release(self, client: socket.socket) -> None:
        self._loop.unwatch(client.fileno())
        self._clients.discard(client)

    def _serve(self, client: socket.socket) -> None:
        try:
            data = client.recv(ipc.MAX_CONTROL_MESSAGE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(client)
            return
        reply: ipc.MessageBase
        try:
            request = ipc.decode_any(data, REQUESTS)
        except ipc.IPCError as exc:
            reply = ipc.Refusal(message=f"bad request: {exc}")
        else:
            if isinstance(request, ipc_input.AttachInput):
                # Let go first: if taken, the connection is the relay's to watch.
                self._release(client)
                refusal = self._attach(client)
                if refusal is None:
                    return
                self._take(client)
                reply = refusal
            elif isinstance(request, Request):
                reply = self._answer(request)
            else:
                reply = ipc.Hello()
        self._send(client, reply.encode())

    def _send(self, client: socket.socket, data: bytes) -> None:
        try:
            client.send(data)
        except OSError:
            self._drop(client)

    def _drop(self, client: socket.socket) -> None:
        self._release(client)
        client.close()
