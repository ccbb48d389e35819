"""How fast this machine's host is at what a serving step's host side does, so that host-time figures taken on
different machines (a GPU machine's virtual CPUs, a laptop, CI) can be told apart from changes in our code:

  python_loop   ns per iteration of a plain Python loop (attribute reads, a list append, an int add)
  thread_wake   us for one round trip between two threads through threading.Event (set, wake, set back):
                what handing a step's outputs from the engine thread to the event loop costs at least
  process_pipe  us for one round trip of a small message through a multiprocessing Pipe to a child process
                (what --engine-process pays per step instead of the GIL)

    python benchmarks/host_speed.py [--json PATH]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.results import cpu_name, write_json  # noqa: E402


def python_loop(n: int = 2_000_000) -> float:
    class Row:
        __slots__ = ("count",)

        def __init__(self) -> None:
            self.count = 0
    row, out = Row(), []
    t0 = time.perf_counter()
    for i in range(n):
        row.count += i & 7
        out.append(row.count)
    return (time.perf_counter() - t0) / n * 1e9


def thread_wake(rounds: int = 2000) -> float:
    ping, pong = threading.Event(), threading.Event()

    def echo() -> None:
        for _ in range(rounds):
            ping.wait()
            ping.clear()
            pong.set()
    t = threading.Thread(target=echo)
    t.start()
    t0 = time.perf_counter()
    for _ in range(rounds):
        ping.set()
        pong.wait()
        pong.clear()
    elapsed = time.perf_counter() - t0
    t.join()
    return elapsed / rounds * 1e6


def _echo_child(conn) -> None:
    while (msg := conn.recv()) is not None:
        conn.send(msg)


def process_pipe(rounds: int = 2000) -> float:
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=_echo_child, args=(child,))
    proc.start()
    parent.send(0), parent.recv()  # the child is up
    t0 = time.perf_counter()
    for i in range(rounds):
        parent.send(i)
        parent.recv()
    elapsed = time.perf_counter() - t0
    parent.send(None)
    proc.join()
    return elapsed / rounds * 1e6


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    cpu = cpu_name()
    cases = {"python_loop": ("ns/iter", python_loop), "thread_wake": ("us", thread_wake),
             "process_pipe": ("us", process_pipe)}
    rows = []
    print(f"host: {cpu}, {mp.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"switch interval {sys.getswitchinterval() * 1e3:.1f} ms; median of {args.repeats}")
    print(f"{'case':<14} {'median':>10} {'min':>10} {'max':>10}  unit")
    for name, (unit, fn) in cases.items():
        values = [fn() for _ in range(args.repeats)]
        rows.append({"case": name, "unit": unit, "median": statistics.median(values), "min": min(values),
                     "max": max(values)})
        print(f"{name:<14} {rows[-1]['median']:>10.2f} {min(values):>10.2f} {max(values):>10.2f}  {unit}")
    write_json({"host": cpu, "cpus": mp.cpu_count(), "python": platform.python_version(), "rows": rows},
               args.json, "host_speed.json")
    return rows


if __name__ == "__main__":
    main()
