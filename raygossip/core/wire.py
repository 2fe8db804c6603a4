"""The one wire type: a letter between two agents, with an enum kind and a payload the transport can carry."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import torch

from ..algorithms.compressors import Compressed


class Kind(str, Enum):
    """What a letter carries."""

    GOSSIP = "q"  # a rule's message of this round (a compressed difference, or a whole model for D-PSGD)
    FULL = "full"  # the sender's whole public copy x_hat (after a restart or a resume)
    MARK = "mark"  # a rule without public copies after a restart: the sender is at this round
    LOST = "lost"  # dropped by fault injection: it takes the place of the message in the stream
    FIN = "fin"  # the sender's loop ended: nothing more comes
    STATE = "state"  # the sender's whole model, for an agent that joins (a timeline's join) at the next round


@dataclass
class Letter:
    """One letter in a sender's stream to one receiver (FIFO by `seq` within an incarnation)."""

    sender: int
    round: int
    kind: Kind
    payload: Any  # a Compressed in memory; on the wire, see to_wire
    sent_at: float
    available_at: float  # not readable before (simulated link delay)
    seq: int | None = None  # letters the sender sent this receiver before this one (None: arrival order)
    incarnation: int = 0  # which life of the sender wrote it (a restarted agent starts a new stream at seq 0)
    arrived_at: float = 0.0

    @property
    def final(self) -> bool:
        return self.kind is Kind.FIN

    def to_wire(self, payload: Any = None) -> tuple:
        """A plain tuple for another process; `payload` replaces the Compressed (the sender converts it once
        for all its receivers: see wire_payload)."""
        return (self.sender, self.incarnation, self.seq, self.round, self.kind.value, payload, self.sent_at,
                self.available_at)

    @staticmethod
    def from_wire(wire: tuple, payload: Any) -> "Letter":
        sender, incarnation, seq, round_index, kind, _, sent_at, available_at = wire
        return Letter(sender, round_index, Kind(kind), payload, sent_at, available_at, seq=seq,
                      incarnation=incarnation)


def wire_payload(message: Compressed) -> tuple[int, dict[str, np.ndarray]]:
    """A message as (numel, numpy arrays) for another process; CPU tensors without a copy (compressors return
    fresh tensors, and the transport copies them before anything could change them)."""
    return message.numel, {k: v.detach().cpu().numpy() for k, v in message.arrays.items()}


def message_from_wire(numel: int, arrays: dict[str, np.ndarray], device: torch.device) -> Compressed:
    """A received message as tensors on `device`; on CPU without a copy (decompressors only read them)."""
    if device.type != "cpu":
        return Compressed({k: torch.tensor(np.asarray(a), device=device) for k, a in arrays.items()}, int(numel))
    return Compressed({k: torch.from_numpy(np.asarray(a)) for k, a in arrays.items()}, int(numel))
