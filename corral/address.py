"""Addresses of corrald listeners: `HOST:PORT`, `[V6]:PORT` or `unix:PATH`."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

DEFAULT_PORT = 7443

# sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_UNIX_PATH = 107


class AddressError(ValueError):
    """The text is not a corral address."""


@dataclass(frozen=True, slots=True)
class TCPAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UnixAddress:
    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


Address = TCPAddress | UnixAddress


def parse_address(text: str) -> Address:
    """Parse `HOST:PORT`, `[IPV6]:PORT`, `HOST` (port 7443) or `unix:PATH`.

    Raises AddressError with a sentence naming what is wrong.
    """
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if not path:
            raise AddressError("unix: address needs a path, e.g. unix:/run/corrald.sock")
        if "\0" in path:
            raise AddressError("unix socket path contains a NUL byte")
        if len(path.encode()) > MAX_UNIX_PATH:
            raise AddressError(
                f"unix socket path is {len(path.encode())} bytes; the limit is {MAX_UNIX_PATH}"
            )
        return UnixAddress(path)
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise AddressError(f"invalid address {text!r}: missing ']'")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            message = f"invalid address {text!r}: {host!r} is not an IPv6 address"
            raise AddressError(message) from None
        if rest and not rest.startswith(":"):
            raise AddressError(f"invalid address {text!r}: expected ':PORT' after ']'")
        port_text = rest[1:] if rest else ""
    elif text.count(":") > 1:
        raise AddressError(f"invalid address {text!r}: write IPv6 addresses as [ADDR]:PORT")
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise AddressError(f"invalid address {text!r}: missing host")
    if not port_text:
        return TCPAddress(host, DEFAULT_PORT)
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise AddressError(f"invalid address {text!r}: port must be a number from 0 to 65535")
    return TCPAddress(host, int(port_text))
