"""Wall and CPU seconds of an agent's training loop, by phase (what bench/ and summary.json report)."""

from __future__ import annotations

import time

PHASES = ("train", "send", "wait", "absorb", "mix", "report", "sleep")


class PhaseClock:
    """`with clock("send"): ...` adds that block's wall and thread-CPU seconds to its phase."""

    def __init__(self) -> None:
        self.wall = dict.fromkeys(PHASES, 0.0)
        self.cpu = dict.fromkeys(PHASES, 0.0)
        self.loop_cpu = self.process_cpu = 0.0

    def __call__(self, phase: str) -> "_Span":
        return _Span(self, phase)


class _Span:
    __slots__ = ("clock", "phase", "wall", "cpu")

    def __init__(self, clock: PhaseClock, phase: str) -> None:
        self.clock, self.phase = clock, phase

    def __enter__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.thread_time()

    def __exit__(self, *exc) -> None:
        self.clock.wall[self.phase] += time.perf_counter() - self.wall
        self.clock.cpu[self.phase] += time.thread_time() - self.cpu
