"""The in-process transport: letters between nodes of one process go straight into the receiver's mailbox."""

from __future__ import annotations

from typing import Callable, Iterator

from ..algorithms.compressors import Compressed
from .wire import Letter


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
