"""A thread-safe inbox, FIFO per sender, whose letters become readable at their delivery time."""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

from .peers import PeerTable
from .wire import Kind, Letter


WHOLE_COPIES = (Kind.LINK, Kind.RESYNC)


class Mailbox:
    """Accepts letters from a mail thread while the owner trains; the owner waits with deadlines.

    Letters that carry a sequence number are queued in that order, whatever order the transport
    delivered them in (Ray does not order calls into a threaded actor): a letter that arrives early
    is held until the ones before it from the same sender have arrived.

    A sender can be absent: down or dropped in the agent's peer table (`peers`: liveness is kept there once; a letter
    from a newer life of a sender starts its new stream and tells the table it is back) or finished (its final letter
    arrived). Letters from a dropped sender or an older life are refused. Waits never wait for an absent sender.
    """

    def __init__(self, senders: list[int], peers: PeerTable) -> None:
        self.peers = peers
        self.queues: dict[int, deque[Letter]] = {j: deque() for j in senders}
        self.held: dict[int, dict[int, Letter]] = {}  # sender -> seq -> letter that arrived ahead of its turn
        self.next_seq: dict[int, int] = {}
        self.taken_round: dict[int, int] = {}  # sender -> newest round already taken from its queue
        self.stream_life: dict[int, int] = {}  # sender -> the life whose stream the queue holds
        self.finished: set[int] = set()
        self.asks: list[tuple[int, int]] = []  # (sender, round) of resync requests (Kind.ASK), in each stream's order
        self.refused = 0  # letters from an older life or a dropped sender
        self.condition = threading.Condition()
        self.waiters: list[Callable[[float], bool]] = []  # predicates of the threads in wait_until

    def put(self, letter: Letter) -> None:
        with self.condition:
            letter.arrived_at = time.time()
            sender = letter.sender
            current = self.stream_life.get(sender, 0)
            if sender in self.peers.dropped or letter.incarnation < current:
                self.refused += 1
                return
            if letter.incarnation > current:
                self._new_stream(sender, letter.incarnation)
            queue = self.queues.setdefault(sender, deque())
            if letter.seq is None:
                self._enqueue(queue, letter)
            else:
                held = self.held.setdefault(sender, {})
                held[letter.seq] = letter
                expected = self.next_seq.get(sender, 0)
                if expected not in held:
                    return  # an earlier letter from this sender is still on its way: nothing new to read
                while expected in held:
                    self._enqueue(queue, held.pop(expected))
                    expected += 1
                self.next_seq[sender] = expected
            if letter.final or self._wakes_a_waiter(letter):
                self.condition.notify_all()

    def _enqueue(self, queue: deque, letter: Letter) -> None:
        if letter.final:
            self.finished.add(letter.sender)
        elif letter.kind is Kind.ASK:  # (a request, not a message: no round of the sender's to wait for)
            self.asks.append((letter.sender, letter.round))
        else:
            queue.append(letter)

    def take_asks(self) -> list[tuple[int, int]]:
        """The resync requests that arrived since the last call, (sender, round of its lost message)."""
        with self.condition:
            asks, self.asks = self.asks, []
        return asks

    def _new_stream(self, sender: int, incarnation: int) -> None:
        """A restarted sender: forget its old stream (unread letters included) and expect seq 0 again."""
        self.stream_life[sender] = incarnation
        self.peers.heard(sender, incarnation)
        self.queues[sender] = deque()
        self.held.pop(sender, None)
        self.next_seq[sender] = 0
        self.taken_round[sender] = -1
        self.finished.discard(sender)

    def wake(self, gone: list[int] = ()) -> None:
        """The peer table changed (senders down or dropped): waiters look again; a dropped sender's unread letters
        are thrown away."""
        with self.condition:
            for sender in gone:
                self.queues[sender] = deque()
                self.held.pop(sender, None)
            self.condition.notify_all()

    def absent(self, sender: int) -> bool:
        return self.peers.absent(sender) or sender in self.finished

    def _wakes_a_waiter(self, letter: Letter) -> bool:
        """Whether a waiter must wake: its predicate now holds, or it must re-arm its timer for a letter that
        becomes readable later. Waking it for nothing costs a thread switch (and cold caches) per letter."""
        if not self.waiters:
            return False
        now = time.time()
        return letter.available_at > now or any(predicate(now) for predicate in self.waiters)

    def _ready(self, letter: Letter, now: float) -> bool:
        return letter.available_at <= now

    def wait_until(self, predicate: Callable[[float], bool], deadline: float) -> bool:
        """Wait until predicate(now) holds or the deadline; the predicate is re-checked when a letter arrives
        (by the delivering thread, under the lock: keep it cheap) and at delivery times.

        Whoever changes what the predicate reads other than through put() must notify the condition."""
        with self.condition:
            self.waiters.append(predicate)
            try:
                while True:
                    now = time.time()
                    if predicate(now):
                        return True
                    if now >= deadline:
                        return False
                    self.condition.wait(timeout=min(deadline, self._next_delivery(now)) - now)
            finally:
                self.waiters.remove(predicate)

    def _next_delivery(self, now: float) -> float:
        upcoming = [l.available_at for q in self.queues.values() for l in q if l.available_at > now]
        return min(upcoming) if upcoming else now + 3600.0

    def has_round(self, sender: int, round_index: int, now: float) -> bool:
        """Whether a letter of round >= round_index from `sender` was already taken or is queued and readable
        (or the sender is absent: nothing will come). A link letter or an asked-for copy (LINK, RESYNC) does not
        count: it goes ahead of its round's message in the stream, and a sync round must absorb that message too."""
        if self.taken_round.get(sender, -1) >= round_index or self.absent(sender):
            return True
        return any(l.round >= round_index and l.kind not in WHOLE_COPIES and self._ready(l, now)
                   for l in self.queues.get(sender, ()))

    def has_link(self, sender: int, round_index: int, now: float) -> bool:
        """Whether the link letter (Kind.LINK) of round_index from `sender` was taken or is queued and readable (or
        the sender is absent)."""
        if self.taken_round.get(sender, -1) >= round_index or self.absent(sender):
            return True
        return any(l.round >= round_index and l.kind is Kind.LINK and self._ready(l, now)
                   for l in self.queues.get(sender, ()))

    def take_ready(self, sender: int, up_to_round: int | None = None) -> list[Letter]:
        """Pop, in order, the readable letters from `sender` (only rounds <= up_to_round if given)."""
        now = time.time()
        taken = []
        with self.condition:
            queue = self.queues.get(sender, deque())
            while queue and self._ready(queue[0], now) and (up_to_round is None or queue[0].round <= up_to_round):
                taken.append(queue.popleft())
            if taken:
                self.taken_round[sender] = max(self.taken_round.get(sender, -1), taken[-1].round)
        return taken
