"""How a node's letters travel (the Transport protocol) and whom it reports to (the Supervisor protocol), and the
in-process transport: letters between nodes of one process go straight into the receiver's mailbox. The Ray
engine's implementations are engines/ray_links.py's RayTransport and CoordinatorClient."""

from __future__ import annotations

from typing import Callable, Iterator, Protocol

import torch

from ..algorithms.compressors import Compressed
from .wire import Letter


class Transport(Protocol):
    """How one node's letters reach the others. `post` never blocks on the receiver's training."""

    pulls: bool  # whether letters wait on links that `pull` must read (shared-memory channels)

    def post(self, receiver: int, letter: Letter) -> None: ...

    def pull(self, sender: int, satisfied: Callable[[], bool], deadline: float,
             stopped: Callable[[], bool]) -> Iterator[Letter]: ...

    def open(self, letters: list[Letter]) -> list[Compressed | None]: ...

    def close(self, peer: int) -> None: ...


class Supervisor(Protocol):
    """The node's line to whoever supervises the run (the Ray engine's coordinator)."""

    def event(self, event: dict) -> None: ...

    def report(self, agent: int, step: int, accuracy: float | None, state: dict[str, torch.Tensor], loss: float,
               traffic: dict, incarnation: int) -> None: ...

    def keep_snapshot(self, agent: int, incarnation: int, tensors: dict[str, torch.Tensor], meta: dict) -> None: ...

    def keep_checkpoint(self, agent: int, incarnation: int, step: int, tensors: dict[str, torch.Tensor],
                        meta: dict) -> None: ...

    def crash(self, agent: int, round_index: int, step: int) -> None: ...

    def diverged(self, agent: int, incarnation: int, step: int, what: str) -> None: ...

    def flush(self) -> None: ...


class InProcessTransport:
    """Delivers by reference: a message is computed once and only read by its receivers (compressors return
    fresh tensors), so nothing is copied or serialised. `nodes` maps agent ids to their GossipNode."""

    pulls = False

    def __init__(self, nodes: dict) -> None:
        self.nodes = nodes

    def post(self, receiver: int, letter: Letter) -> None:
        self.nodes[receiver].accept(letter)

    def pull(self, sender: int, satisfied: Callable[[], bool], deadline: float,
             stopped: Callable[[], bool]) -> Iterator[Letter]:
        return iter(())

    def open(self, letters: list[Letter]) -> list[Compressed | None]:
        return [letter.payload for letter in letters]

    def close(self, peer: int) -> None:
        pass
