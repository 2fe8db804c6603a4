"""An agent's state as it crosses processes: (parameter vector, buffers), own copies, traffic counters."""

from __future__ import annotations

import numpy as np
import torch

from raygossip.core.agent import Traffic


def split_state(arrays: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """An agent's state arrays as (parameter vector, buffers by name), copied into tensors."""
    params = torch.from_numpy(np.array(arrays["params"]))
    buffers = {k[len("buffer."):]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith("buffer.")}
    return params, buffers


def copied_state(arrays: dict[str, np.ndarray], meta: dict) -> tuple[dict[str, np.ndarray], dict]:
    """An agent's state as this process's own copy (the arrays may live in memory the agent's process owns)."""
    return {k: np.array(v, copy=True) for k, v in arrays.items()}, meta


def traffic_of(counts: dict) -> Traffic:
    """An agent's traffic counters (from its stats or report) as a Traffic record."""
    return Traffic(counts["bytes_sent"], counts["messages_sent"])
