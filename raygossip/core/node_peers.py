"""What a gossip node does when peers die, come back or go for good (the supervisor's news), over its peer table."""

from __future__ import annotations

import time

from .wire import Kind


class PeerEvents:
    """The peer-event part of a GossipNode (a mixin: `self` is the node)."""

    def peers_down(self, agents: list[int]) -> None:
        """These peers died: stop waiting for them and sending to them."""
        for j in agents:
            self.transport.close(j)
        with self.link_lock:
            for j in agents:
                self.peers.mark_down(j)
                self.mailbox.mark_down(j)
        for j in agents:
            if self.peers.is_neighbour(j):
                self.event("neighbour_down", neighbour=j, round=self.round_reached)

    def peer_restarted(self, agent: int, incarnation: int) -> None:
        """Peer `agent` came back: start a new stream to it with this agent's resync letter."""
        self.transport.close(agent)
        with self.link_lock:
            if not self.peers.restarted(agent, incarnation):
                return
            if agent in self.resync_receivers():
                self.post_resync(agent)
                if self.finished_loop:
                    self.post(agent, Kind.FIN, self.plan.total_rounds, None, time.time(), 0.0)

    def peer_dropped(self, agent: int) -> None:
        """Peer `agent` is gone for good: the rule forgets it and its weight goes to the self weight."""
        self.transport.close(agent)
        with self.link_lock:
            self.forget(agent)

    def forget(self, agent: int) -> None:
        if not self.peers.drop(agent):
            return
        self.last_models.pop(agent, None)
        self.mailbox.mark_down(agent, gone=True)
        if self.core.link_copies is not None:  # its known public copy leaves s with the weight it has there
            weight = self.link_weight(agent)
            if weight > 0.0:
                self.core.drop_link(agent, weight)

    def learn_peers(self, incarnations: dict[int, int], dropped: list[int], down: list[int]) -> None:
        """A restarted agent learns who is dropped, down, and in which life each peer is."""
        with self.link_lock:
            self.peers.incarnation.update({int(j): int(i) for j, i in incarnations.items()})
            for j in dropped:
                self.forget(j)
            for j in down:
                self.peers.mark_down(j)
                self.mailbox.mark_down(j)
