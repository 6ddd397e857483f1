"""What counting this process's open descriptors costs, as corrald counts
them for its admins' reserve (corral.supervisor.descriptors).

    .venv/bin/python bench/fd_count.py [--counts 100,1000,5000,19000]

Opens socket pairs up to each count (the hard RLIMIT_NOFILE must allow
it) and times, over 20 rounds each, one `stat` of /proc/self/fd (its size
is the count on Linux 6.2 and later) and one listing of it (the count on
any kernel), and `Descriptors.count()` as corrald calls it at each accept.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import socket
import time
from collections.abc import Callable

from corral.supervisor.descriptors import Descriptors

ROUNDS = 20


def timed(what: Callable[[], object]) -> float:
    """Seconds one call of `what` takes, the mean of ROUNDS."""
    began = time.perf_counter()
    for _ in range(ROUNDS):
        what()
    return (time.perf_counter() - began) / ROUNDS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="100,1000,5000,19000")
    counts = [int(count) for count in parser.parse_args().counts.split(",")]
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"kernel {platform.release()}, RLIMIT_NOFILE {hard}")
    held: list[socket.socket] = []
    descriptors = Descriptors()
    for count in counts:
        while len(os.listdir("/proc/self/fd")) < count:
            held.extend(socket.socketpair())
        size = os.stat("/proc/self/fd").st_size
        stat = timed(lambda: os.stat("/proc/self/fd"))
        listing = timed(lambda: os.listdir("/proc/self/fd"))
        counted = timed(descriptors.count)
        print(
            f"{descriptors.count():6d} open (stat size {size}): stat {stat * 1e6:6.1f} us, "
            f"listing {listing * 1e3:6.2f} ms, Descriptors.count() {counted * 1e6:6.1f} us"
        )


if __name__ == "__main__":
    main()
