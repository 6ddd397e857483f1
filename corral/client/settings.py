"""Where the client connects and as whom: flags first, then the environment."""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path
from typing import Any

from corral.client.connecting import CONNECT_TIMEOUT
from corral.client.errors import ConfigError
from corral.pki_layout import CLIENT_KEY_FILE

DEFAULT_ADDR = "127.0.0.1:7443"


def setting(args: argparse.Namespace, name: str, env: str) -> str | None:
    """The option `name` if given, else the environment variable `env`."""
    value: str | None = getattr(args, name, None)
    if value is None:
        value = os.environ.get(env) or None
    return value


def connect_args(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of `connect` for these options; ConfigError
    when no identity is given."""
    identity = setting(args, "identity", "CORRAL_IDENTITY")
    if identity is None:
        raise ConfigError("no identity: pass --identity DIR or set CORRAL_IDENTITY")
    return {
        "address": setting(args, "addr", "CORRAL_ADDR") or DEFAULT_ADDR,
        "identity": identity,
        "server_name": getattr(args, "server_name", None),
        "timeout": getattr(args, "connect_timeout", CONNECT_TIMEOUT),
    }


def warn_if_key_exposed(identity: str | os.PathLike[str]) -> None:
    """Say on stderr, as ssh does, when the identity's private key may be
    read by others than its owner: whoever reads it can act as us."""
    key = Path(identity) / CLIENT_KEY_FILE
    try:
        mode = key.stat().st_mode
    except OSError:
        return  # connecting says what is wrong with it
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        sys.stderr.write(
            f"corral: warning: {key} is readable by others (mode "
            f"{stat.S_IMODE(mode):04o}): anyone who reads it can act as this identity; "
            f"`chmod 600 {key}`\n"
        )
