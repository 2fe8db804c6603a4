"""The one wire type: a letter between two agents, with an enum kind and a payload the transport can carry."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any



class Kind(str, Enum):
    """What a letter carries."""

    GOSSIP = "q"  # a rule's message of this round (a compressed difference, or a whole model for D-PSGD)
    FULL = "full"  # the sender's whole public copy x_hat (after a restart or a resume)
    MARK = "mark"  # a rule without public copies after a restart: the sender is at this round
    LOST = "lost"  # dropped by fault injection: it takes the place of the message in the stream
    FIN = "fin"  # the sender's loop ended: nothing more comes
    STATE = "state"  # the sender's whole model, for an agent that joins (a timeline's join) at the next round
    LINK = "link"  # the sender's whole public copy x_hat, to a neighbour whose link from it a timeline opens now
    ASK = "ask"  # a receiver that missed one of the sender's messages asks for its whole public copy (RESYNC)
    RESYNC = "resync"  # the sender's whole public copy x_hat, asked for (ASK), ahead of its round's message


@dataclass
class Letter:
    """One letter in a sender's stream to one receiver (FIFO by `seq` within an incarnation)."""

    sender: int
    round: int
    kind: Kind
    payload: Any  # a Compressed (or None) in memory; on the wire what the transport made of it (to_wire)
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
        for all its receivers: Compressed.to_wire)."""
        return (self.sender, self.incarnation, self.seq, self.round, self.kind.value, payload, self.sent_at,
                self.available_at)

    @staticmethod
    def from_wire(wire: tuple, payload: Any) -> "Letter":
        sender, incarnation, seq, round_index, kind, _, sent_at, available_at = wire
        return Letter(sender, round_index, Kind(kind), payload, sent_at, available_at, seq=seq,
                      incarnation=incarnation)
