"""How long one-shot `corral` commands take, against `python -c pass`.

Run as root on the host (it starts a real corrald on a temporary state
directory and dev PKI, and real jobs):

    .venv/bin/python bench/cli.py [--repeat 20] [--check] [--imports]

Issue 19 asks for `corral ps`, `status`, `info` and `run -- true` in at
most 3.5 times the wall time of `python -c pass` on the same machine. Each
runs as a person runs it: the `corral` script beside this Python, a new
process each time, its output to /dev/null. Rounds are interleaved (pass,
ps, status, info, run, pass, ...), `--repeat` of them, so that a busy
moment of the machine weighs on every command alike; the medians and their
ratios to `python -c pass` are printed. With `--check`, the exit status is
1 when a ratio is above the limit. With `--imports`, the modules `corral
info` imports beyond `python -c pass`, the costliest first
(`-X importtime`, self time: the measure inflates them).

The environment may set PYTHONDONTWRITEBYTECODE (a container's, a test
runner's): every module without a cached .pyc would then be compiled at
every run, which an installed corral never does. The commands run without
it, and once before the rounds, so their bytecode is cached as it would be.
Numbers go to docs/BENCHMARKS.md with the command that produced them.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from benchlib import Daemon, corrald

LIMIT = 3.5  # issue 19: "at most 3.5x the wall time of `python -c pass`"


def corral_command() -> list[str]:
    """The `corral` script installed beside this Python, as a person runs it."""
    script = Path(sys.executable).with_name("corral")
    return [str(script)] if script.exists() else [sys.executable, "-m", "corral.client.cli"]


def environment(daemon: Daemon) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(CORRAL_ADDR=daemon.address, CORRAL_IDENTITY=str(daemon.identity))
    return env


def wall_time(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def measure(daemon: Daemon, repeat: int) -> dict[str, list[float]]:
    env = environment(daemon)
    corral = corral_command()
    started = subprocess.run(
        [*corral, "start", "--", "true"], env=env, capture_output=True, text=True, check=True
    )
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "corral ps": [*corral, "ps"],
        "corral status ID": [*corral, "status", started.stdout.strip()],
        "corral info": [*corral, "info"],
        "corral run -- true": [*corral, "run", "--", "true"],
    }
    for argv in commands.values():  # bytecode cached, files in the page cache
        wall_time(argv, env)
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(repeat):
        for name, argv in commands.items():
            samples[name].append(wall_time(argv, env))
    return samples


def report(samples: dict[str, list[float]]) -> float:
    """Print the medians and ratios; return the largest ratio."""
    base = statistics.median(samples["python -c pass"])
    worst = 0.0
    print(f"{'command':22} {'median':>9} {'ratio':>6}")
    for name, times in samples.items():
        median = statistics.median(times)
        ratio = median / base
        if name != "python -c pass":
            worst = max(worst, ratio)
        print(f"{name:22} {median * 1e3:6.1f} ms {ratio:5.2f}x")
    return worst


_IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)")


def imports(argv: list[str], env: dict[str, str]) -> dict[str, int]:
    """Module -> self time in µs, from `-X importtime`."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
    )
    return {m[2]: int(m[1]) for m in map(_IMPORT_LINE.match, result.stderr.splitlines()) if m}


def print_imports(daemon: Daemon, top: int = 25) -> None:
    env = environment(daemon)
    base = imports(["-c", "pass"], env)
    info = imports(["-m", "corral.client.cli", "info"], env)
    by_package: Counter[str] = Counter()
    for module, micros in info.items():
        if module not in base:
            parts = module.split(".")
            by_package[".".join(parts[:3] if parts[0] == "corral" else parts[:1])] += micros
    total = sum(by_package.values())
    print(f"\n`corral info` imports beyond `python -c pass`: {total / 1e3:.1f} ms (self times)")
    for package, micros in by_package.most_common(top):
        print(f"  {micros / 1e3:6.1f} ms  {package}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20, help="rounds (default 20)")
    parser.add_argument(
        "--check", action="store_true", help=f"exit 1 if a ratio is above {LIMIT:g}"
    )
    parser.add_argument(
        "--imports", action="store_true", help="show what `corral info` imports, costliest first"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("cli.py needs root (corrald runs jobs in namespaces and cgroups)")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; "
          f"load {Path('/proc/loadavg').read_text().strip()}")  # fmt: skip
    with corrald() as daemon:
        worst = report(measure(daemon, args.repeat))
        if args.imports:
            print_imports(daemon)
    if args.check and worst > LIMIT:
        print(f"a command took {worst:.2f}x `python -c pass`: more than {LIMIT:g}x")
        sys.exit(1)


if __name__ == "__main__":
    main()
