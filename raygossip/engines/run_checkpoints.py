"""The coordinator's whole-run checkpoints: a consistent cut at a barrier, written once every live agent's state is in."""

from __future__ import annotations

import threading
import time

import numpy as np
import ray
import torch

from raygossip.engines.agent_states import copied_state


class Checkpoints:
    """Part of the Coordinator actor (it mixes this in): agents' states at a checkpoint step, and the writing."""


    @ray.method(concurrency_group="report")
    def keep_checkpoint(self, agent: int, incarnation: int, step: int, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """One agent's state at a checkpoint step; once every live agent's is in, write the checkpoint."""
        if incarnation != self.incarnations[agent] or step in self.written:  # (resent after a restart of this actor)
            return
        copied = copied_state(arrays, meta)
        if self.config.runtime.on_failure == "restart":
            self.snapshots[agent] = copied
        with self.condition:
            arrived = self.arrivals.setdefault(step, {})
            arrived[agent] = copied
            complete = set(arrived) >= set(self.live())
        if complete:  # written by another thread: it waits for this step's records, which come through this group
            threading.Thread(target=self.write_checkpoint, args=(step,), daemon=True).start()

    def write_checkpoint(self, step: int) -> None:
        from raygossip.checkpoint import save_checkpoint

        evaluated = [s for s in range(step + 1) if self.plan.is_eval_step(s)]
        with self.condition:
            arrived = self.arrivals.pop(step, None)
            if arrived is None:
                return
            done_before = {r["step"] - 1 for r in self.before["records"]}
            self.condition.wait_for(lambda: self.book.done([s for s in evaluated if s not in done_before]),
                                    timeout=self.config.runtime.wait_timeout_s)
            records = self.before["records"] + [r for r in self.book.records if r["step"] <= step + 1]
            self.events.append({"kind": "checkpoint_written", "time_s": time.time() - self.started, "step": step + 1})
            events = self.before["events"] + sorted(self.events, key=lambda e: e["time_s"])
        agents = [({k: torch.from_numpy(v) for k, v in arrived[i][0].items()}, arrived[i][1]) if i in arrived
                  else ({}, {"dropped": True}) for i in range(len(self.agents))]
        rounds_done = (step + 1) // self.plan.local_steps
        run_state = {
            "step": step + 1, "records": len(records), "record_list": records, "events": events,
            "wall_time_s": time.time() - self.started, "rounds_done": rounds_done,
            "communication_rounds": self.communication_rounds(rounds_done),
            "dropped": sorted(self.dropped),
            "timeline_scheduled": {str(k): r for k, r in self.plan.timeline.scheduled.items()},
            "timeline_skipped": sorted(self.timeline_skipped),
        }
        save_checkpoint(self.checkpoint_dir, self.config, run_state, agents)
        with self.condition:
            self.written.add(step)
        self.ledger.touch()
        for host in self.hosts(self.live()):
            host.release.remote(step)
