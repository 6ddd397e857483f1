"""Who am I to corrald? The smallest use of the async client.

Run it against `make run`'s corrald, after pasting the line it prints:

    python examples/info.py

It reads CORRAL_ADDR and CORRAL_IDENTITY like the CLI does.
"""

from __future__ import annotations

import os
import sys

from corral.client.client import connect
from corral.client.errors import CorralError
from corral.client.script import run_script


async def main() -> int:
    address = os.environ.get("CORRAL_ADDR", "127.0.0.1:7443")
    identity = os.environ.get("CORRAL_IDENTITY", "var/pki/clients/admin")
    try:
        # One connection carries any number of requests; it is closed on exit.
        async with connect(address, identity) as client:
            info = await client.info()
    except CorralError as exc:  # every failure is one clear line
        print(f"info.py: {exc}", file=sys.stderr)
        return exc.exit_status
    print(f"corrald {info.version} knows us as {info.identity.name} ({info.identity.role})")
    print(f"it runs jobs with cgroup {info.cgroup} and holds {info.jobs} jobs")
    return 0


if __name__ == "__main__":
    # Ctrl+C cancels main (its jobs are cleaned up on the way out) and exits 130.
    sys.exit(run_script(main))
