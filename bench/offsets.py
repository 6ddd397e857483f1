"""How long corrald takes to check a `logs` offset: find where records begin.

    .venv/bin/python bench/offsets.py [--mib 1024] [--record 65536] [--rounds 3]

Writes a log of `--mib` MiB of output records of `--record` bytes each (as
the shim writes them) in a temporary directory, then times
`misplaced_offset` for an offset inside its last record: the worst case, a
scan of the whole log. Reports the median and the rate. The check runs in
a thread, once per stream that starts at a nonzero offset.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import msgpack

from corral.worker.output import misplaced_offset

TIME_NS = 1_796_394_127_691_253_932  # any nanosecond timestamp: 9 bytes packed, as real ones


def write_log(path: Path, mib: int, record: int) -> int:
    """A log of whole records, at least `mib` MiB; its size in bytes."""
    packed = msgpack.packb([1, TIME_NS, b"x" * record], use_bin_type=True)
    count = -(-(mib << 20) // len(packed))
    with path.open("wb") as log:
        for _ in range(count):
            log.write(packed)
    return count * len(packed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="size of the log (default 1024)")
    parser.add_argument("--record", type=int, default=65536, help="bytes of output a record")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as directory:
        path = Path(directory) / "output.log"
        size = write_log(path, args.mib, args.record)
        times = []
        for _ in range(args.rounds):
            began = time.perf_counter()
            nearest = misplaced_offset(path, size - 1)
            times.append(time.perf_counter() - began)
            assert nearest is not None  # inside the last record: refused
        median = statistics.median(times)
        print(
            f"{size / (1 << 20):.0f} MiB of {args.record}-byte records: median {median:.3f} s "
            f"({size / (1 << 20) / median:.0f} MiB/s) over {args.rounds} rounds"
        )


if __name__ == "__main__":
    main()
