"""TensorBoard event files in a run folder: each metrics record as scalars and histograms, the summary at the end."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raygossip.config import Config
from raygossip.engines.common import metric_info


def named(key: str, metric: str) -> str:
    """An accuracy key or tag as the run's metric names it."""
    return key.replace("accuracy", metric)

# (record key, TensorBoard tag): the scalars of every record that has them.
SCALARS = (
    ("merged_test_accuracy", "accuracy/merged_test"),
    ("merged_validation_accuracy", "accuracy/merged_validation"),
    ("mean_local_test_accuracy", "accuracy/mean_local_test"),
    ("min_local_test_accuracy", "accuracy/min_local_test"),
    ("max_local_test_accuracy", "accuracy/max_local_test"),
    ("train_loss", "train/loss"),
    ("consensus_distance", "consensus/distance"),
    ("bytes_sent", "traffic/bytes_sent"),
    ("messages_sent", "traffic/messages_sent"),
    ("communication_rounds", "traffic/communication_rounds"),
    ("gamma", "schedule/gamma"),
    ("wall_time_s", "time/wall_s"),
)
# (summary key, TensorBoard tag): the run's headline numbers, at its last step.
SUMMARY_SCALARS = (
    ("merged_test_accuracy", "summary/merged_test_accuracy"),
    ("merged_test_accuracy_before_merge", "summary/merged_test_accuracy_before_merge"),
    ("wall_time_s", "summary/wall_time_s"),
    ("train_s", "summary/train_s"),
    ("stale_messages", "summary/stale_messages"),
    ("wait_timeouts", "summary/wait_timeouts"),
)


class TensorBoardLog:
    """A SummaryWriter on the run folder, driven by the run's observer (the step axis is the local step)."""

    def __init__(self, out_dir: str | Path, config: Config, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out_dir), purge_step=purge_step, flush_secs=5)
        self.lr = config.train.lr
        self.metric = metric_info(config)[0]  # accuracy keys and tags take the run's metric's name
        self.step = 0

    def record(self, record: dict) -> None:
        self.step = step = int(record["step"])
        for key, tag in SCALARS:
            key, tag = named(key, self.metric), named(tag, self.metric)
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], step)
        if record.get("lr_multiplier") is not None:
            self.writer.add_scalar("schedule/lr", self.lr * record["lr_multiplier"], step)
        local = record.get(named("local_test_accuracy", self.metric))
        if local:
            self.writer.add_histogram(named("accuracy/local_test", self.metric), np.asarray(local), step)

    def summary(self, summary: dict) -> None:
        for key, tag in SUMMARY_SCALARS:
            key, tag = named(key, self.metric), named(tag, self.metric)
            if isinstance(summary.get(key), (int, float)):
                self.writer.add_scalar(tag, summary[key], self.step)
        waits = summary.get("waited_s_per_agent")
        if waits:  # the Ray engine's stragglers: how long each agent waited for its neighbours
            self.writer.add_histogram("stragglers/waited_s", np.asarray(waits, dtype=float), self.step)
            for agent, seconds in enumerate(waits):
                self.writer.add_scalar(f"stragglers/waited_s/agent_{agent:03d}", seconds, self.step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
