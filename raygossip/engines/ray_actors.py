"""Ray actors: an agent actor (a thin shell around AgentCore that moves messages) and the coordinator."""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from typing import Any

import numpy as np
import ray
import torch

from raygossip.algorithms.compressors import Compressed
from raygossip.algorithms.merge import consensus_distance, global_average
from raygossip.algorithms.topology import build_topology
from raygossip.config import Config, from_dict
from raygossip.core.agent import AgentCore
from raygossip.core.plan import RunPlan
from raygossip.core.timing import StepClock, link_delay
from raygossip.data.datasets import Dataset, Split
from raygossip.engines.common import MergedModel, RunSetup, average_buffers, network_record
from raygossip.engines.mailbox import Letter, Mailbox

warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

# Messages up to this size travel by value inside the deliver call (one RPC, nothing to fetch); larger ones
# are put into the object store once and every receiver gets a reference. Measured on a 2-core VM (sender
# plus receiver CPU), one message by reference costs ~6.5-7.5 ms (put, borrower bookkeeping, get) at any
# size up to 1 MiB and ~8.5 ms at 4 MiB; by value ~1.5 ms plus ~3.5 ms per MiB: they meet between 1 and
# 2 MiB (bench/README.md).
INLINE_BYTES = 1 << 20
INLINE_LIMIT = INLINE_BYTES + (64 << 10)  # Ray's max_direct_call_object_size for that: + room for the envelope
PHASES = ("train", "send", "wait", "absorb", "mix", "report", "sleep")


def actor_env(threads: int) -> dict[str, str]:
    """Environment of actor worker processes on a cluster this driver did not start: native thread pools
    pinned to the CPU share, and Ray's inline limit for call arguments raised to INLINE_LIMIT (else Ray
    would put larger arguments into the object store itself, once per receiver)."""
    pinned = str(max(1, threads))
    return {"OMP_NUM_THREADS": pinned, "MKL_NUM_THREADS": pinned, "OPENBLAS_NUM_THREADS": pinned,
            "RAY_max_direct_call_object_size": str(INLINE_LIMIT)}


class PhaseClock:
    """Wall and CPU (training thread) seconds of the training loop, by phase; `with clock("send"): ...`."""

    def __init__(self) -> None:
        self.wall = dict.fromkeys(PHASES, 0.0)
        self.cpu = dict.fromkeys(PHASES, 0.0)
        self.loop_cpu = self.process_cpu = 0.0

    def __call__(self, phase: str) -> "_Span":
        return _Span(self, phase)


class _Span:
    __slots__ = ("clock", "phase", "wall", "cpu")

    def __init__(self, clock: PhaseClock, phase: str) -> None:
        self.clock, self.phase = clock, phase

    def __enter__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.thread_time()

    def __exit__(self, *exc) -> None:
        self.clock.wall[self.phase] += time.perf_counter() - self.wall
        self.clock.cpu[self.phase] += time.thread_time() - self.cpu


def process_start_time() -> float | None:
    """When this process started (epoch seconds), from /proc on Linux; None elsewhere."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            booted = time.time() - float(uptime.read().split()[0])
        return booted + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def pin_threads(threads: int) -> None:
    """torch intra-op threads to the CPU share; one inter-op thread (an agent runs one op at a time)."""
    torch.set_num_threads(max(1, threads))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work already ran in this process
        pass


def dataset_to_numpy(dataset: Dataset, test_x: torch.Tensor, test_y: torch.Tensor) -> dict[str, Any]:
    """The arrays every actor needs, as numpy (zero-copy through the object store)."""
    return {
        "name": dataset.name, "num_classes": dataset.num_classes, "input_shape": tuple(dataset.input_shape),
        "augment": dataset.augment, "train_x": dataset.train.x.numpy(), "train_y": dataset.train.y.numpy(),
        "test_x": test_x.numpy(), "test_y": test_y.numpy(),
    }


def dataset_from_numpy(arrays: dict[str, Any]) -> tuple[Dataset, torch.Tensor, torch.Tensor]:
    test_x, test_y = torch.from_numpy(arrays["test_x"]), torch.from_numpy(arrays["test_y"])
    dataset = Dataset(
        name=arrays["name"], train=Split(torch.from_numpy(arrays["train_x"]), torch.from_numpy(arrays["train_y"])),
        test=Split(test_x, test_y), num_classes=arrays["num_classes"], input_shape=tuple(arrays["input_shape"]),
        augment=arrays["augment"],
    )
    return dataset, test_x, test_y


def wire_arrays(message: Compressed) -> dict[str, np.ndarray]:
    """The message's arrays as numpy for Ray; CPU tensors without a copy (compressors return fresh tensors,
    and Ray copies them into the call or the object store before anything could change them)."""
    return {k: v.detach().cpu().numpy() for k, v in message.arrays.items()}


def received_message(arrays: dict[str, np.ndarray], numel: int, device: torch.device) -> Compressed:
    """A received message as tensors on `device`; on CPU without a copy (decompressors only read them)."""
    if device.type != "cpu":
        return Compressed.from_numpy(arrays, numel, device)
    return Compressed({k: torch.from_numpy(np.asarray(a)) for k, a in arrays.items()}, int(numel))


def pick_device(requested: str, num_gpus: float) -> torch.device:
    """The device Ray assigned (a GPU share when num_gpus > 0), else CPU."""
    if requested not in ("auto",):
        return torch.device(requested)
    if num_gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPU
    return torch.device("cpu")


@ray.remote(concurrency_groups={"train": 1, "mail": 1, "control": 1})
class AgentActor:
    """One agent: runs its own training loop; neighbours push message references into its mailbox."""

    def __init__(self, agent_id: int, config_dict: dict, data: list, shard: np.ndarray, steps_per_epoch: int,
                 slowdown: float, threads: int) -> None:
        init_began = time.time()
        pin_threads(threads)
        self.agent_id = agent_id
        self.config: Config = from_dict(Config, config_dict)
        dataset, self.test_x, self.test_y = dataset_from_numpy(ray.get(data[0]))
        data_fetched = time.time()
        topology = build_topology(self.config.topology.name, self.config.agents.count, self.config.topology.weights,
                                  self.config.topology.params)
        self.plan = RunPlan(self.config, topology, steps_per_epoch)
        runtime = self.config.runtime
        self.device = pick_device(runtime.device, runtime.num_gpus_per_agent)
        planned = time.time()
        self.core = AgentCore(agent_id, self.config, dataset, shard, self.plan.total_steps, self.device)
        self.clock = StepClock(runtime.timing, slowdown, self.config.seed, agent_id)
        self.mailbox = Mailbox(list(range(self.config.agents.count)))
        self.peers: dict[int, Any] = {}
        self.coordinator = None
        self.link_delays: dict[int, list[float]] = {}
        self.waited_s = 0.0
        self.timeouts = 0
        self.stale_messages = 0
        self.stop_requested = threading.Event()
        self.outstanding: list[Any] = []  # reports and events in flight to the coordinator
        self.sent_seq: dict[int, int] = {}  # receiver -> letters sent to it so far (the mailbox orders by it)
        self.by_reference = 0  # messages that went through the object store (larger than INLINE_BYTES)
        self.phases = PhaseClock()
        self.startup = {"process_started": process_start_time(), "init_began": init_began, "data_fetched": data_fetched,
                        "planned": planned, "init_done": time.time()}

    # ------------------------------------------------------------ wiring and mail

    @ray.method(concurrency_group="control")
    def connect(self, peers: dict[int, Any], coordinator: Any) -> dict:
        self.peers = peers
        self.coordinator = coordinator
        return {"agent": self.agent_id, "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "device": str(self.device), "threads": torch.get_num_threads(), "startup": self.startup}

    @ray.method(concurrency_group="mail", num_returns=0, enable_task_events=False)
    def deliver(self, letter: tuple) -> None:
        """Called by a neighbour: queue (sender, seq, round, payload, sent_at, available_at).

        The payload is ("value", numel, arrays), or ("ref", [ObjectRef]) wrapped in a list so that Ray
        does not fetch it before this runs. One argument and no return value: the cheapest Ray call.
        """
        sender, seq, round_index, payload, sent_at, available_at = letter
        self.mailbox.put(Letter(sender, round_index, payload, sent_at, available_at, seq=seq))

    # ------------------------------------------------------------ the loop

    @ray.method(concurrency_group="train")
    def run(self) -> dict:
        plan, runtime = self.plan, self.config.runtime
        clock = self.phases
        cpu_began, process_began = time.thread_time(), time.process_time()
        for step in range(self.core.step, plan.total_steps):
            if self.stop_requested.is_set():
                break
            started = time.perf_counter()
            with clock("train"):
                self.core.train_step()
            if self.clock.active:
                with clock("sleep"):
                    time.sleep(self.clock.extra_delay(time.perf_counter() - started))
            round_index = plan.round_after_step(step)
            if round_index is not None:
                self.gossip(round_index)
            if plan.is_eval_step(step):
                with clock("report"):
                    self.report_evaluation(step, round_index)
        ray.get(self.outstanding)  # the coordinator has every report before the run counts as finished
        self.outstanding.clear()
        clock.loop_cpu += time.thread_time() - cpu_began
        clock.process_cpu += time.process_time() - process_began
        return self.stats()

    def gossip(self, round_index: int) -> None:
        round_plan = self.plan.round_plan(round_index)
        if round_plan is None:
            return
        me = self.agent_id
        receivers = round_plan.receivers_of(me)
        if receivers:
            with self.phases("send"):
                self.send(round_index, receivers)
        senders = round_plan.senders_to(me)
        if senders or me in round_plan.mixers:
            self.receive(round_index, senders, round_plan)
        if me in round_plan.mixers:
            with self.phases("mix"):
                self.core.mix(round_plan.weights[me][0], self.plan.gamma(round_index))

    def send(self, round_index: int, receivers: list[int]) -> None:
        """Emit this round's message and push it to every receiver: by value when small, else one object-store
        copy shared by all receivers (its reference wrapped in a list so Ray does not fetch it early)."""
        message = self.core.emit(receivers)
        arrays = wire_arrays(message)
        if message.nbytes <= INLINE_BYTES:
            payload: tuple = ("value", message.numel, arrays)
        else:
            payload = ("ref", [ray.put((message.numel, arrays))])
            self.by_reference += 1
        sent_at = time.time()
        available_at = sent_at + link_delay(message.nbytes, self.config.runtime.timing)
        for receiver in receivers:
            seq = self.sent_seq.get(receiver, 0)
            self.sent_seq[receiver] = seq + 1
            self.peers[receiver].deliver.remote((self.agent_id, seq, round_index, payload, sent_at, available_at))

    def wait_round(self, round_index: int) -> int | None:
        """The round whose messages this mode must wait for (None: do not wait)."""
        mode = self.config.runtime.mode
        if mode == "sync":
            return round_index
        if mode == "bounded":
            return round_index - self.config.runtime.staleness
        return None

    def receive(self, round_index: int, senders: list[int], round_plan) -> None:
        """Wait as the mode says (with a deadline), then absorb what arrived, in order per sender."""
        wait_for = self.wait_round(round_index)
        if wait_for is not None and wait_for >= 0:
            expected = self.expected_senders(wait_for, senders if wait_for == round_index else None)
            if expected:
                started = time.time()
                with self.phases("wait"):
                    ok = self.mailbox.wait_until(
                        lambda now: self.stop_requested.is_set()
                        or all(self.mailbox.has_round(j, wait_for, now) for j in expected),
                        started + self.config.runtime.wait_timeout_s,
                    )
                self.waited_s += time.time() - started
                if not ok and not self.stop_requested.is_set():
                    self.timeouts += 1
                    self.event("wait_timeout", round=round_index, missing=[
                        j for j in expected if not self.mailbox.has_round(j, wait_for, time.time())])
        with self.phases("absorb"):
            self.absorb_ready(round_index, senders, round_plan)

    def absorb_ready(self, round_index: int, senders: list[int], round_plan) -> None:
        """Absorb every readable letter (rounds <= round_index in sync mode), in order per sender."""
        up_to = round_index if self.config.runtime.mode == "sync" else None
        rule_is_dpsgd = self.config.gossip.rule == "dpsgd"
        self_weight, row = round_plan.weights.get(self.agent_id, (1.0, {}))
        weights = dict(row)
        if not rule_is_dpsgd:
            matrix = self.plan.topology.mixing(round_index)
            weights = {j: float(matrix[self.agent_id, j]) for j in range(len(matrix)) if j != self.agent_id}
        taken: list[Letter] = []
        for sender in sorted(set(senders) | set(self.mailbox.queues)):
            letters = self.mailbox.take_ready(sender, up_to)
            if rule_is_dpsgd:
                letters = letters[-1:]  # a full model: only the newest counts
            taken.extend(letters)
        for letter, (numel, arrays) in zip(taken, self.open_letters(taken)):
            self.record_delay(letter)
            if letter.round != round_index:
                self.stale_messages += 1
            weight = weights.get(letter.sender, 0.0)
            if weight > 0.0:
                self.core.absorb(received_message(arrays, numel, self.device), weight)

    @staticmethod
    def open_letters(letters: list[Letter]) -> list[tuple[int, dict]]:
        """(numel, arrays) of each letter; the ones sent by reference are fetched in one ray.get."""
        refs = [letter.payload[1][0] for letter in letters if letter.payload[0] == "ref"]
        fetched = iter(ray.get(refs) if refs else ())
        return [next(fetched) if letter.payload[0] == "ref" else letter.payload[1:] for letter in letters]

    def expected_senders(self, round_index: int, known: list[int] | None) -> list[int]:
        if known is not None:
            return known
        earlier = self.plan.round_plan(round_index)
        return earlier.senders_to(self.agent_id) if earlier is not None else []

    def record_delay(self, letter: Letter) -> None:
        readable = max(letter.arrived_at, letter.available_at)
        self.link_delays.setdefault(letter.sender, []).append(readable - letter.sent_at)

    @ray.method(concurrency_group="control")
    def stop(self) -> int:
        """Ask the training loop to stop after its current step (a bounded/async run's quorum finished)."""
        self.stop_requested.set()
        with self.mailbox.condition:
            self.mailbox.condition.notify_all()
        return self.core.step

    # ------------------------------------------------------------ reporting

    def event(self, kind: str, **fields) -> None:
        if self.coordinator is not None:
            self.outstanding.append(self.coordinator.record_event.remote(
                {"kind": kind, "agent": self.agent_id, "time": time.time(), **fields}))

    def report_evaluation(self, step: int, round_index: int | None) -> None:
        accuracy = None
        if self.config.eval.local:
            accuracy = self.core.evaluate(self.test_x, self.test_y, self.config.eval.batch_size)
        state = ray.put(self.state_arrays())
        self.outstanding.append(self.coordinator.report.remote(
            self.agent_id, step, accuracy, [state], self.core.take_mean_loss(), self.traffic_counts()))

    def traffic_counts(self) -> dict:
        traffic = self.core.traffic
        return {"bytes_sent": traffic.bytes_sent, "messages_sent": traffic.messages_sent,
                "per_link": dict(traffic.per_link), "per_link_messages": dict(traffic.per_link_messages)}

    def stats(self) -> dict:
        delays = {j: {"count": len(v), "min_s": min(v), "mean_s": float(np.mean(v)), "max_s": max(v)}
                  for j, v in self.link_delays.items() if v}
        return {"agent": self.agent_id, "steps": self.core.step, "waited_s": self.waited_s, "timeouts": self.timeouts,
                "stale_messages": self.stale_messages, "link_delays": delays, "phase_s": dict(self.phases.wall),
                "cpu_s": {**self.phases.cpu, "loop": self.phases.loop_cpu, "process": self.phases.process_cpu},
                "sent_by_reference": self.by_reference, **self.traffic_counts()}

    # ------------------------------------------------------------ state (control group)

    def state_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"params": self.core.parameters_vector().cpu().numpy()}
        arrays.update({f"buffer.{k}": v.cpu().numpy() for k, v in self.core.buffers().items()})
        return arrays

    @ray.method(concurrency_group="control")
    def get_state(self) -> dict[str, np.ndarray]:
        return self.state_arrays()

    @ray.method(concurrency_group="control")
    def rule_state(self) -> dict[str, np.ndarray]:
        out = {name: t.cpu().numpy() for name, t in self.core.state.tensors().items()}
        out["params"] = self.core.parameters_vector().cpu().numpy()
        return out

    @ray.method(concurrency_group="control")
    def drain(self, expected: dict[int, int], timeout_s: float) -> int:
        """Absorb every message still queued once `expected[j]` messages from each sender j have arrived."""
        deadline = time.time() + timeout_s
        self.mailbox.wait_until(
            lambda now: all(self.mailbox.received.get(j, 0) >= count for j, count in expected.items())
            and all(l.available_at <= now for q in self.mailbox.queues.values() for l in q),
            deadline,
        )
        matrix = self.plan.topology.mixing(0)
        absorbed = 0
        for sender in sorted(self.mailbox.queues):
            letters = self.mailbox.take_ready(sender)
            for letter, (numel, arrays) in zip(letters, self.open_letters(letters)):
                if self.config.gossip.rule != "dpsgd":
                    self.core.absorb(received_message(arrays, numel, self.device), float(matrix[self.agent_id, sender]))
                absorbed += 1
        return absorbed

    @ray.method(concurrency_group="control")
    def load_state(self, state: list) -> None:
        arrays = ray.get(state[0])
        self.core.load_parameters_vector(torch.from_numpy(arrays["params"]))
        self.core.load_buffers({k[len("buffer."):]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("buffer.")})

    @ray.method(concurrency_group="control")
    def reestimate_batchnorm(self, batches: int) -> dict[str, np.ndarray]:
        self.core.reestimate_batchnorm(batches)
        return {f"buffer.{k}": v.cpu().numpy() for k, v in self.core.buffers().items()}

    @ray.method(concurrency_group="control")
    def evaluate(self) -> float:
        return self.core.evaluate(self.test_x, self.test_y, self.config.eval.batch_size)

    @ray.method(concurrency_group="control")
    def late_report(self) -> tuple:
        """This stopped agent's evaluation, to complete records of steps it never reached."""
        accuracy = self.core.evaluate(self.test_x, self.test_y, self.config.eval.batch_size) if self.config.eval.local else None
        return accuracy, [ray.put(self.state_arrays())], self.core.take_mean_loss(), self.traffic_counts()


def split_state(arrays: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    params = torch.from_numpy(np.array(arrays["params"]))
    buffers = {k[len("buffer."):]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith("buffer.")}
    return params, buffers


@ray.remote(concurrency_groups={"report": 1, "control": 2})
class Coordinator:
    """Owns the plan and the run's clock; starts the agents, gathers evaluations, performs the final merge."""

    def __init__(self, config_dict: dict, data: list, steps_per_epoch: int) -> None:
        pin_threads(1)
        self.config: Config = from_dict(Config, config_dict)
        dataset, test_x, test_y = dataset_from_numpy(ray.get(data[0]))
        topology = build_topology(self.config.topology.name, self.config.agents.count, self.config.topology.weights,
                                  self.config.topology.params)
        self.plan = RunPlan(self.config, topology, steps_per_epoch)
        setup = RunSetup(self.config, dataset, [], topology, self.plan, test_x, test_y, {})
        self.merged = MergedModel(setup)
        self.agents: list[Any] = []
        self.pending: dict[int, dict[int, tuple]] = {}
        self.records: list[dict] = []
        self.events: list[dict] = []
        self.progress: dict[int, int] = {}
        self.condition = threading.Condition()
        self.started = time.time()
        self.finished: list[dict] | None = None

    @ray.method(concurrency_group="control")
    def ready(self) -> bool:
        return True

    @ray.method(concurrency_group="control")
    def start(self, agents: list[Any]) -> None:
        """Start every agent's own loop; returns at once (the loops run in the agents)."""
        self.agents = agents
        self.started = time.time()
        self.runs = [agent.run.remote() for agent in agents]
        self.event("run_started", agents=len(agents))

    @ray.method(concurrency_group="control")
    def wait_finished(self, timeout_s: float) -> list[dict]:
        """Wait for the agents' loops; in bounded/async mode, once a quorum finished, stop the rest."""
        n = len(self.runs)
        if self.config.runtime.mode != "sync":
            quorum = max(1, math.ceil(self.config.runtime.finish_quorum * n))
            ready, rest = ray.wait(self.runs, num_returns=quorum, timeout=timeout_s)
            if rest:
                stopped = [i for i, ref in enumerate(self.runs) if ref in rest]
                steps = ray.get([self.agents[i].stop.remote() for i in stopped])
                self.event("quorum_finished", finished=n - len(stopped), stopped=stopped, stopped_at_steps=steps)
        ready, rest = ray.wait(self.runs, num_returns=n, timeout=timeout_s)
        if rest:
            raise TimeoutError(f"{len(rest)} agents did not finish within {timeout_s:g} s")
        finished = ray.get(self.runs)
        self.complete_pending()
        self.event("agents_finished", steps=[s["steps"] for s in finished])
        with self.condition:
            self.finished = finished
            self.condition.notify_all()  # a waiting poll returns at once
        return finished

    def complete_pending(self) -> None:
        """Records of steps some agents never reached (they were stopped): fill in their final state."""
        with self.condition:
            steps = sorted(self.pending)
        if not steps:
            return
        late = ray.get([agent.late_report.remote() for agent in self.agents])
        for step in steps:
            for agent, report in enumerate(late):
                with self.condition:
                    missing = agent not in self.pending.get(step, {agent: None})
                if missing:
                    self.report(agent, step, *report)

    def event(self, kind: str, **fields) -> None:
        with self.condition:
            self.events.append({"kind": kind, "time_s": time.time() - self.started, **fields})

    @ray.method(concurrency_group="report")
    def record_event(self, event: dict) -> None:
        self.record_events([event])

    @ray.method(concurrency_group="report")
    def record_events(self, events: list[dict]) -> None:
        stamped = []
        for event in events:
            event = dict(event)
            event["time_s"] = event.pop("time", time.time()) - self.started
            stamped.append(event)
        with self.condition:
            self.events.extend(stamped)

    @ray.method(concurrency_group="report")
    def report(self, agent: int, step: int, accuracy: float | None, state: list, loss: float, traffic: dict) -> None:
        """An agent's evaluation at `step`; once all agents reported that step, build the network record."""
        with self.condition:
            self.pending.setdefault(step, {})[agent] = (accuracy, state, loss, traffic)
            complete = len(self.pending[step]) == self.config.agents.count
        if not complete:
            return
        reports = self.pending.pop(step)
        order = sorted(reports)
        states = [split_state(ray.get(reports[i][1][0])) for i in order]
        vectors = [params for params, _ in states]
        self.merged.load(global_average(vectors), average_buffers([buffers for _, buffers in states]))
        accuracies = [reports[i][0] for i in order]

        class _Traffic:  # the counts agents reported, shaped like core.agent.Traffic for network_record
            def __init__(self, t: dict) -> None:
                self.bytes_sent, self.messages_sent = t["bytes_sent"], t["messages_sent"]

        round_index = self.plan.round_after_step(step)
        rounds_done = (step + 1) // self.plan.local_steps
        record = network_record(
            step=step, plan=self.plan, vectors=vectors,
            local_accuracies=None if accuracies[0] is None else accuracies,
            merged_accuracy=self.merged.evaluate(), traffic=[_Traffic(reports[i][3]) for i in order],
            train_loss=float(np.mean([reports[i][2] for i in order])), rounds_done=rounds_done,
            communication_rounds=sum(self.plan.round_plan(r) is not None for r in range(rounds_done)),
            wall_time_s=time.time() - self.started,
        )
        del round_index
        with self.condition:
            self.records.append(record)
            self.records.sort(key=lambda r: r["step"])
            self.condition.notify_all()

    @ray.method(concurrency_group="control")
    def poll(self, seen: int, timeout_s: float) -> tuple[list[dict], bool]:
        """(records after the first `seen`, whether the agents finished), waiting up to timeout_s for either."""
        with self.condition:
            if len(self.records) <= seen and self.finished is None:
                self.condition.wait(timeout=timeout_s)
            return list(self.records[seen:]), self.finished is not None

    @ray.method(concurrency_group="control")
    def final_merge(self) -> dict:
        """Gather every agent's parameters, average exactly, send the average back, re-estimate batch norm."""
        spec = self.config.schedule.final_merge
        states = [split_state(s) for s in ray.get([agent.get_state.remote() for agent in self.agents])]
        average = global_average([params for params, _ in states])
        buffers = average_buffers([b for _, b in states])
        arrays = {"params": average.numpy(), **{f"buffer.{k}": v.numpy() for k, v in buffers.items()}}
        ref = ray.put(arrays)
        ray.get([agent.load_state.remote([ref]) for agent in self.agents])
        self.merged.load(average, buffers)
        if spec.bn == "local":
            estimates = ray.get([agent.reestimate_batchnorm.remote(spec.bn_batches) for agent in self.agents])
            merged_buffers = average_buffers([split_state({"params": arrays["params"], **e})[1] for e in estimates])
            self.merged.load(average, merged_buffers)
        elif spec.bn == "global":
            self.merged.setup.dataset = self.merged.setup.dataset  # the global sample comes from the full train set
            self.merged.reestimate_on_global_sample(spec.bn_batches, self.config.seed)
            new = {f"buffer.{k}": v.detach().cpu().numpy() for k, v in self.merged.model.named_buffers()}
            ref = ray.put({"params": arrays["params"], **new})
            ray.get([agent.load_state.remote([ref]) for agent in self.agents])
        accuracy = self.merged.evaluate()
        self.event("merge_done", merged_test_accuracy=accuracy, bn=spec.bn)
        return {"merged_accuracy": accuracy, "state_dict": {k: v.numpy() for k, v in self.merged.state_dict().items()}}

    @ray.method(concurrency_group="control")
    def get_events(self) -> list[dict]:
        with self.condition:
            return sorted(self.events, key=lambda e: e["time_s"])

    @ray.method(concurrency_group="control")
    def consensus(self) -> float:
        states = [split_state(s) for s in ray.get([agent.get_state.remote() for agent in self.agents])]
        return consensus_distance([p for p, _ in states])
