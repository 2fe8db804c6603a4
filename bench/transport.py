"""What one gossip message costs on Ray: by value inside the call vs by reference through the object store.

    python bench/transport.py [--sizes 24000,246824,1048576,4194304] [--messages 600] [--repeat 2]

Two threaded actors shaped like the agent actor (concurrency groups train/mail/control); one sends
`--messages` messages to the other, which takes them from its inbox on its training thread (and, by
reference, fetches them with one ray.get per batch). Prints the CPU seconds per message of the sending
process, the receiving process and the raylet + GCS, medians over the repeats. The size where the two
ways cost the same sets INLINE_BYTES in raygossip/engines/ray_setup.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # bind Ray to loopback (before ray.init)

import numpy as np
import ray


def ray_daemons_cpu_s() -> float:
    """CPU seconds so far of this machine's raylet and GCS processes (Linux /proc; 0 elsewhere)."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            command = (entry / "cmdline").read_bytes()
            if b"raylet/raylet" not in command and b"gcs_server" not in command:
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return total


@ray.remote(concurrency_groups={"train": 1, "mail": 1, "control": 1})
class Peer:
    def __init__(self) -> None:
        self.inbox: list = []
        self.condition = threading.Condition()
        self.peer = None

    @ray.method(concurrency_group="control")
    def connect(self, peer) -> None:
        self.peer = peer

    @ray.method(concurrency_group="mail", num_returns=0, enable_task_events=False)
    def deliver(self, letter: tuple) -> None:
        with self.condition:
            self.inbox.append(letter)
            self.condition.notify_all()

    @ray.method(concurrency_group="train")
    def send(self, count: int, size: int, by_reference: bool) -> float:
        arrays = {"values": np.random.default_rng(0).random(size // 4, dtype=np.float32)}
        began = time.process_time()
        for i in range(count):
            payload = ("ref", [ray.put((size // 4, arrays))]) if by_reference else ("value", size // 4, arrays)
            self.peer.deliver.remote((0, i, i, payload, time.time(), 0.0))
            if i % 4 == 3:
                time.sleep(0.002)  # let the receiver keep up, as a gossip round would
        return time.process_time() - began

    @ray.method(concurrency_group="train")
    def receive(self, count: int) -> float:
        began, got = time.process_time(), 0
        while got < count:
            with self.condition:
                while not self.inbox:
                    self.condition.wait(1.0)
                letters, self.inbox = self.inbox, []
            refs = [letter[3][1][0] for letter in letters if letter[3][0] == "ref"]
            if refs:
                ray.get(refs)  # fetched, then dropped with the letters
            got += len(letters)
        return time.process_time() - began


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="24000,246824,1048576,4194304", help="payload bytes, comma-separated")
    parser.add_argument("--messages", type=int, default=600)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    limit = str(max(sizes) + (64 << 10))  # let Ray inline every size we try by value
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    env = {"env_vars": {"RAY_max_direct_call_object_size": limit, "OMP_NUM_THREADS": "1"}}
    sender, receiver = (Peer.options(num_cpus=0.25, runtime_env=env).remote() for _ in range(2))
    ray.get([sender.connect.remote(receiver), receiver.connect.remote(sender)])
    results: dict[tuple[int, str], list[tuple[float, float, float]]] = {}
    for _ in range(args.repeat):
        for size in sizes:
            for way in ("value", "reference"):
                daemons = ray_daemons_cpu_s()
                received = receiver.receive.remote(args.messages)
                sent = ray.get(sender.send.remote(args.messages, size, way == "reference"))
                got = ray.get(received)
                results.setdefault((size, way), []).append((sent, got, ray_daemons_cpu_s() - daemons))
    print(f"{os.cpu_count()} cores; CPU microseconds per message, medians of {args.repeat} x {args.messages} messages")
    print(f"{'bytes':>9} {'way':<10} {'sender':>7} {'receiver':>9} {'raylet+GCS':>11} {'total':>7}")
    for (size, way), runs in results.items():
        parts = [1e6 * statistics.median(r[k] for r in runs) / args.messages for k in range(3)]
        print(f"{size:>9} {way:<10} {parts[0]:>7.0f} {parts[1]:>9.0f} {parts[2]:>11.0f} {sum(parts):>7.0f}")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
