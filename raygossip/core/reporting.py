"""A node's line to its supervisor: events, evaluations and the state tensors that records, merges and checks read."""

from __future__ import annotations

import threading
import time

import torch

from .agent import AgentCore
from .transports import Supervisor


class Reporter:
    """What one agent tells the supervisor, and the tensors and counts it is asked for. `supervisor` is None until
    the engine connects one (the reference engine never does: events then go nowhere)."""

    def __init__(self, core: AgentCore, lock: threading.Lock,
                 evaluation_set: tuple[torch.Tensor, torch.Tensor] | None = None, incarnation: int = 0) -> None:
        self.core = core
        self.agent_id = core.agent_id
        self.lock = lock
        self.evaluation_set = evaluation_set
        self.incarnation = incarnation
        self.supervisor: Supervisor | None = None

    def event(self, kind: str, **fields) -> None:
        if self.supervisor is not None:
            self.supervisor.event({"kind": kind, "agent": self.agent_id, "time": time.time(), **fields})

    def evaluate(self) -> float:
        x, y = self.evaluation_set
        return self.core.evaluate(x, y, self.core.config.eval.batch_size)

    def evaluation(self) -> tuple[float | None, dict[str, torch.Tensor], float, dict]:
        """(local test accuracy or None, state tensors, mean loss since the last one, traffic counters)."""
        accuracy = self.evaluate() if self.core.config.eval.local else None
        return accuracy, self.state_tensors(), self.core.take_mean_loss(), self.traffic_counts()

    def report_evaluation(self, step: int) -> None:
        if self.supervisor is not None:
            self.supervisor.report(self.agent_id, step, *self.evaluation(), self.incarnation)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers (what records and the merge need)."""
        tensors = {"params": self.core.parameters_vector()}
        tensors.update({f"buffer.{k}": v for k, v in self.core.buffers().items()})
        return tensors

    def rule_tensors(self) -> dict[str, torch.Tensor]:
        """The rule's state, the copies of the neighbours' public copies, and the parameters (for checks)."""
        with self.lock:
            out = {name: t.detach().clone() for name, t in self.core.state.tensors().items()}
            out.update({f"link.{j}": t.clone() for j, t in self.core.known_copies().items()})
            out["params"] = self.core.parameters_vector()
        return out

    def traffic_counts(self) -> dict:
        traffic = self.core.traffic
        return {"bytes_sent": traffic.bytes_sent, "messages_sent": traffic.messages_sent,
                "per_link": dict(traffic.per_link), "per_link_messages": dict(traffic.per_link_messages)}
