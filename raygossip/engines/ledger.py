"""The coordinator's ledger: what a restarted coordinator needs to go on, in a JSON file written atomically."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Callable

from raygossip.results import write_text_atomic

FILE = "coordinator-ledger.json"


class Ledger:
    """The coordinator's state that its death must not take: records delivered, events, failures, incarnations,
    drops, the names of restarted actors, the timeline and averaging-rate decisions, the run's clock. Kept as a
    file in the run's state folder on the coordinator's node (the driver made it; a restarted coordinator comes
    back to that node). `collect` builds the state; `save` writes it now, `touch` within `every_s`."""

    def __init__(self, folder: str, collect: Callable[[], dict], lock: Any, every_s: float = 0.25) -> None:
        """lock: the owner's lock around its state (reentrant): held while collecting and writing, so a save sees
        one consistent state and two saves never interleave."""
        self.path = Path(folder) / FILE
        self.collect = collect
        self.every_s = every_s
        self.dirty = threading.Event()
        self.lock = lock
        self.closed = False
        threading.Thread(target=self._writer, daemon=True).start()

    @staticmethod
    def count_restart(folder: str) -> None:
        """A restarted coordinator, first thing: one more death in the ledger it left (none on a first start), so
        that a death during the restart's own start-up is counted too."""
        path = Path(folder) / FILE
        if path.exists():
            saved = json.loads(path.read_text())
            saved["deaths"] += 1
            write_text_atomic(path, json.dumps(saved, default=plain))

    def load(self) -> dict | None:
        """The state a previous life of this coordinator saved, or None (a first start)."""
        if not self.path.exists():
            return None
        return json.loads(self.path.read_text())

    def save(self) -> None:
        """Write the state now (a few tries: a record another thread updates in place meanwhile makes json.dumps
        fail; if all fail, the writer thread tries again)."""
        with self.lock:
            if self.closed:
                return
            self.dirty.clear()
            for _ in range(3):
                try:
                    text = json.dumps(self.collect(), default=plain)  # NaN kept as NaN
                    break
                except RuntimeError:  # (dictionary changed size during iteration)
                    continue
            else:
                self.dirty.set()
                return
            write_text_atomic(self.path, text)

    def touch(self) -> None:
        self.dirty.set()

    def close(self) -> None:
        """The run is over: nothing is written any more (the driver removes the folder)."""
        with self.lock:
            self.closed = True

    def _writer(self) -> None:
        while not self.closed:
            if self.dirty.wait(timeout=1.0):
                try:
                    self.save()
                except OSError:  # (the folder is gone: the run is over)
                    return
                threading.Event().wait(self.every_s)


def plain(value: Any) -> Any:
    """numpy scalars as Python numbers, sets and tuples as lists (json.dumps's default)."""
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON")
