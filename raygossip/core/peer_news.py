"""What a node does with the supervisor's news of its peers (died, came back, gone for good), over its peer table."""

from __future__ import annotations

from .agent import AgentCore
from .graph_links import GraphChanges
from .inbox import Inbox
from .outbox import Outbox


class PeerNews:
    """Applies news of peers to the peer table, the mailbox, the streams and the rule state, under the node's lock
    (a control thread calls these while the training thread runs). `events(kind, **fields)` reports to the
    supervisor."""

    def __init__(self, core: AgentCore, outbox: Outbox, inbox: Inbox, graph: GraphChanges, events) -> None:
        self.core = core
        self.outbox = outbox
        self.inbox = inbox
        self.graph = graph
        self.peers = outbox.peers
        self.event = events

    def peers_down(self, agents: list[int]) -> None:
        """These peers died: stop waiting for them and sending to them."""
        for j in agents:
            self.outbox.transport.close(j)
        with self.outbox.lock:
            for j in agents:
                self.peers.mark_down(j)
        self.inbox.mailbox.wake()
        for j in agents:
            if self.peers.is_neighbour(j):
                self.event("neighbour_down", neighbour=j, round=self.outbox.round_reached)

    def peer_restarted(self, agent: int, incarnation: int) -> None:
        """Peer `agent` came back: start a new stream to it with this agent's resync letter."""
        self.outbox.transport.close(agent)
        with self.outbox.lock:
            if self.peers.restarted(agent, incarnation):
                self.outbox.restarted(agent)

    def peer_dropped(self, agent: int) -> None:
        """Peer `agent` is gone for good: the rule forgets it and its weight goes to the self weight."""
        self.outbox.transport.close(agent)
        with self.outbox.lock:
            self.forget(agent)

    def forget(self, agent: int) -> None:
        if not self.peers.drop(agent):
            return
        self.inbox.forget(agent)
        self.inbox.mailbox.wake(gone=[agent])
        weight = self.graph.weight(agent)  # its known public copy leaves s with the weight it has there
        if weight > 0.0:
            self.core.drop_link(agent, weight)

    def learn_peers(self, incarnations: dict[int, int], dropped: list[int], down: list[int]) -> None:
        """A restarted agent learns who is dropped, down, and in which life each peer is."""
        with self.outbox.lock:
            self.peers.learn({int(j): int(i) for j, i in incarnations.items()})
            for j in dropped:
                self.forget(j)
            for j in down:
                self.peers.mark_down(j)
        self.inbox.mailbox.wake()
