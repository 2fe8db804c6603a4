"""Ray actors: an agent actor (a thin shell around AgentCore that moves messages) and the coordinator."""

from __future__ import annotations

import math
import os
import shutil
import threading
import time
import warnings
from typing import Any

import numpy as np
import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raygossip.algorithms.compressors import Compressed
from raygossip.algorithms.merge import consensus_distance, global_average
from raygossip.algorithms.topology import build_topology
from raygossip.config import Config, from_dict
from raygossip.core.agent import AgentCore, Traffic
from raygossip.core.faults import MessageFate, kill_schedule
from raygossip.core.plan import RunPlan
from raygossip.core.timing import StepClock, link_delay
from raygossip.data.datasets import Dataset, Split
from raygossip.engines.channels import ENVELOPE_BYTES, ChannelLinks
from raygossip.engines.common import MergedModel, RunSetup, average_buffers, network_record
from raygossip.engines.mailbox import Letter, Mailbox
from raygossip.engines.snapshots import make_snapshot_dir, read_snapshot, write_snapshot

warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

# Messages up to this size (the default and largest runtime.inline_bytes) travel by value inside the deliver
# call (one RPC, nothing to fetch); larger ones are put into the object store once and every receiver gets a
# reference. Measured on a 2-core VM (sender
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
    """One agent: runs its own training loop; neighbours push letters into its mailbox by actor call, or
    (runtime.transport auto, a sync run on one node) write them into shared-memory channels that its
    training thread reads when it waits (channels.py); a link whose peer dies goes back to calls.

    Letters are (sender, incarnation, seq, round, kind, payload, sent_at, available_at) with kind
    "q" (a gossip message), "full" (the sender's whole public copy, after a restart), "mark" (D-PSGD
    after a restart: the sender is at this round), "lost" (dropped by fault injection) or "fin" (the
    sender's loop ended). The training thread and the control thread (resyncs, drops) share
    `link_lock`, so the rule state and each outgoing stream change atomically.
    """

    def __init__(self, agent_id: int, config_dict: dict, data: list, shard: np.ndarray, steps_per_epoch: int,
                 slowdown: float, threads: int, incarnation: int = 0) -> None:
        init_began = time.time()
        pin_threads(threads)
        self.agent_id = agent_id
        self.incarnation = incarnation
        self.config: Config = from_dict(Config, config_dict)
        dataset, self.test_x, self.test_y = dataset_from_numpy(ray.get(data[0]))
        data_fetched = time.time()
        topology = build_topology(self.config.topology.name, self.config.agents.count, self.config.topology.weights,
                                  self.config.topology.params)
        self.plan = RunPlan(self.config, topology, steps_per_epoch)
        self.base_mixing = topology.mixing(0)
        row = self.base_mixing[agent_id]
        self.base_weights = {j: float(row[j]) for j in range(len(row)) if j != agent_id and row[j] > 0}
        runtime = self.config.runtime
        self.device = pick_device(runtime.device, runtime.num_gpus_per_agent)
        planned = time.time()
        self.core = AgentCore(agent_id, self.config, dataset, shard, self.plan.total_steps, self.device,
                              track_links=runtime.on_failure != "abort")
        self.clock = StepClock(runtime.timing, slowdown, self.config.seed, agent_id)
        self.mailbox = Mailbox(list(range(self.config.agents.count)))
        self.links = ChannelLinks()  # shared-memory channels to and from neighbours on this node (sync runs)
        self.peers: dict[int, Any] = {}
        self.peer_incarnation: dict[int, int] = {}
        self.down: set[int] = set()  # peers that died: nothing is sent to them until they come back
        self.dropped: set[int] = set()  # peers dropped for good (runtime.on_failure: drop)
        self.dropped_weight = 0.0  # sum of W_ij over dropped j: added to the self weight (rows stay stochastic)
        self.link_lock = threading.Lock()
        self.round_reached = self.core.step // self.plan.local_steps - 1
        self.coordinator = None
        self.snapshot_dir: str | None = None  # on the coordinator's node: snapshots go there as files (keep_snapshot)
        self.link_delays: dict[int, list[float]] = {}
        self.waited_s = 0.0
        self.timeouts = 0
        self.stale_messages = 0
        self.lost_messages = 0
        self.resyncs = 0
        self.finished_loop = False
        self.barrier = threading.Event()
        self.barrier_step = -1
        self.stop_requested = threading.Event()
        self.outstanding: list[Any] = []  # reports and events in flight to the coordinator
        self.sent_seq: dict[int, int] = {}  # receiver -> letters sent to it so far (the mailbox orders by it)
        self.by_reference = 0  # messages that went through the object store (larger than runtime.inline_bytes)
        kills = kill_schedule(self.config.faults, self.config.agents.count, self.plan.total_rounds, self.config.seed)
        self.kill_round = kills.get(agent_id) if incarnation == 0 else None
        self.fate = MessageFate(self.config.faults, self.config.seed, agent_id, incarnation)
        self.phases = PhaseClock()
        self.startup = {"process_started": process_start_time(), "init_began": init_began, "data_fetched": data_fetched,
                        "planned": planned, "init_done": time.time()}

    # ------------------------------------------------------------ wiring and mail

    @ray.method(concurrency_group="control")
    def connect(self, peers: dict[int, Any], coordinator: Any, snapshot_dir: tuple[str, str] | None = None,
                incarnations: dict[int, int] | None = None, dropped: list[int] = (), down: list[int] = ()) -> dict:
        """Wire this agent to its peers and the coordinator (a restarted one also learns who is dropped or down).
        snapshot_dir: (node, directory) where agents on that node (the coordinator's) write their snapshots."""
        self.peers = dict(peers)
        self.peer_incarnation = dict(incarnations or {})
        self.coordinator = coordinator
        node = ray.get_runtime_context().get_node_id()
        self.snapshot_dir = snapshot_dir[1] if snapshot_dir is not None and snapshot_dir[0] == node else None
        with self.link_lock:
            for j in dropped:
                self._forget(j)
            for j in down:
                self.down.add(j)
                self.mailbox.mark_down(j)
        return {"agent": self.agent_id, "node": node, "pid": os.getpid(),
                "device": str(self.device), "threads": torch.get_num_threads(), "message_bytes": self.message_bytes(),
                "startup": self.startup,
                "incarnation": self.incarnation}

    @ray.method(concurrency_group="mail", num_returns=0, enable_task_events=False)
    def deliver(self, letter: tuple) -> None:
        """Called by a neighbour: queue one letter (see the class docstring).

        A payload is ("value", numel, arrays), or ("ref", [ObjectRef]) wrapped in a list so that Ray
        does not fetch it before this runs. One argument and no return value: the cheapest Ray call.
        """
        self.accept(letter)

    def accept(self, letter: tuple) -> None:
        sender, incarnation, seq, round_index, kind, payload, sent_at, available_at = letter
        self.mailbox.put(Letter(sender, round_index, payload, sent_at, available_at, seq=seq,
                                incarnation=incarnation, final=kind == "fin", kind=kind))

    def post(self, receiver: int, round_index: int, kind: str, payload: Any, sent_at: float, available_at: float) -> None:
        """Push one letter to `receiver`, next in this agent's stream to it (call with link_lock held): through
        their shared-memory channel when they have one, else by an actor call."""
        seq = self.sent_seq.get(receiver, 0)
        self.sent_seq[receiver] = seq + 1
        letter = (self.agent_id, self.incarnation, seq, round_index, kind, payload, sent_at, available_at)
        if not self.links.write(receiver, letter, time.time() + self.config.runtime.wait_timeout_s):
            self.peers[receiver].deliver.remote(letter)

    @ray.method(concurrency_group="control")
    def open_links(self, readers: dict[int, tuple[Any, str]]) -> dict[int, Any]:
        """Create this agent's channel to each out-neighbour (handle, node id) on its node; returns them."""
        size = self.message_bytes() + ENVELOPE_BYTES  # a larger letter resizes the channel
        return self.links.open(ray.get_runtime_context().current_actor, readers, size)

    def message_bytes(self) -> int:
        """Bytes of a dense message (the whole parameter vector): what a channel is made to hold."""
        x = self.core.parameters_vector()
        return x.numel() * x.element_size()

    @ray.method(concurrency_group="control")
    def attach_links(self, inbound: dict[int, Any]) -> None:
        """Read the in-neighbours' letters from these channels (sender -> channel)."""
        self.links.attach(inbound)

    @ray.method(concurrency_group="control")
    def seal_links(self) -> None:
        """Every reader has attached: the names of this agent's channel semaphores can go (ChannelLinks.seal)."""
        self.links.seal()

    # ------------------------------------------------------------ the loop

    @ray.method(concurrency_group="train")
    def run(self, checkpoints: bool = False, resync: bool = False) -> dict:
        """The training loop to the end (or until stopped). checkpoints: stop at every runtime.checkpoint_every-th
        round until the coordinator wrote the whole run's checkpoint; resync: first resend the whole public copy
        to every neighbour (a restarted agent, or a run resumed from an asynchronous checkpoint)."""
        plan = self.plan
        clock = self.phases
        cpu_began, process_began = time.thread_time(), time.process_time()
        every = self.config.runtime.checkpoint_every if checkpoints else 0
        if self.incarnation > 0 or resync:
            self.announce()
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
            if every and round_index is not None and (round_index + 1) % every == 0 and step + 1 < plan.total_steps:
                with clock("wait"):
                    self.checkpoint_barrier(step)
        with self.link_lock:
            self.finished_loop = True
            for receiver in self.live_receivers(list(self.peers)):
                self.post(receiver, plan.total_rounds, "fin", None, time.time(), 0.0)
        ray.get(self.outstanding, timeout=self.config.runtime.wait_timeout_s)  # every report is in before the end
        self.outstanding.clear()
        clock.loop_cpu += time.thread_time() - cpu_began
        clock.process_cpu += time.process_time() - process_began
        return self.stats()

    def gossip(self, round_index: int) -> None:
        self.round_reached = round_index
        if round_index == self.kill_round:
            self.crash(round_index)
        round_plan = self.plan.round_plan(round_index)
        if round_plan is not None:
            me = self.agent_id
            receivers = round_plan.receivers_of(me)
            if receivers:  # filtered for dead peers inside send(), under link_lock (a peer may come back meanwhile)
                with self.phases("send"):
                    self.send(round_index, receivers)
            senders = round_plan.senders_to(me)
            if senders or me in round_plan.mixers:
                self.receive(round_index, senders, round_plan)
            if me in round_plan.mixers:
                with self.phases("mix"), self.link_lock:
                    self.core.mix(round_plan.weights[me][0] + self.dropped_weight, self.plan.gamma(round_index))
        every = self.config.runtime.snapshot_every
        if every and (round_index + 1) % every == 0 and self.config.runtime.on_failure == "restart":
            self.keep_snapshot()

    def live_receivers(self, receivers: list[int]) -> list[int]:
        return [j for j in receivers if j not in self.down and j not in self.dropped and j in self.peers]

    def send(self, round_index: int, receivers: list[int]) -> None:
        """Emit this round's message and push it to every receiver: by value when small, else one object-store
        copy shared by all receivers (its reference wrapped in a list so Ray does not fetch it early)."""
        with self.link_lock:
            receivers = self.live_receivers(receivers)
            if not receivers:
                return
            message = self.core.emit(receivers)
            payload = self.wire_payload(message.numel, message.nbytes, wire_arrays(message))
            sent_at = time.time()
            available_at = sent_at + link_delay(message.nbytes, self.config.runtime.timing)
            for receiver in receivers:
                lost, extra = self.fate()
                if lost:
                    self.post(receiver, round_index, "lost", None, sent_at, available_at + extra)
                else:
                    self.post(receiver, round_index, "q", payload, sent_at, available_at + extra)

    def wire_payload(self, numel: int, nbytes: int, arrays: dict[str, np.ndarray]) -> tuple:
        if nbytes <= self.config.runtime.inline_bytes or self.links.out:  # a channel takes any size
            return ("value", numel, arrays)
        self.by_reference += 1
        return ("ref", [ray.put((numel, arrays))])

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
                deadline = started + self.config.runtime.wait_timeout_s
                with self.phases("wait"):
                    for j in expected if self.links.inbound else ():  # letters by call are already in the mailbox
                        for letter in self.links.pull(j, lambda: self.mailbox.has_round(j, wait_for, math.inf),
                                                      deadline, self.stop_requested.is_set):
                            self.accept(letter)
                    ok = self.mailbox.wait_until(
                        lambda now: self.stop_requested.is_set()
                        or all(self.mailbox.has_round(j, wait_for, now) for j in expected),
                        deadline,
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
        weights = dict(round_plan.weights.get(self.agent_id, (1.0, {}))[1])
        if not rule_is_dpsgd:
            weights = self.base_weights  # CHOCO/AdaGossip need a static graph
        taken: list[Letter] = []
        for sender in sorted(set(senders) | set(self.mailbox.queues)):
            letters = self.mailbox.take_ready(sender, up_to)
            self.lost_messages += sum(letter.kind == "lost" for letter in letters)
            if rule_is_dpsgd:
                letters = [letter for letter in letters if letter.kind == "q"][-1:]  # a full model: the newest counts
            taken.extend(letter for letter in letters if letter.kind in ("q", "full"))
        with self.link_lock:
            self.apply_letters(taken, weights, round_index)

    def apply_letters(self, letters: list[Letter], weights: dict[int, float], round_index: int | None) -> None:
        """Absorb gossip messages and apply full public copies (call with link_lock held)."""
        for letter, opened in zip(letters, self.open_letters(letters)):
            weight = 0.0 if letter.sender in self.dropped else weights.get(letter.sender, 0.0)
            if opened is None:  # its object-store copy died with its sender
                self.lost_messages += 1
                continue
            numel, arrays = opened
            if letter.kind == "full":
                if self.core.link_copies is not None and weight > 0.0:
                    self.core.resync_link(letter.sender, torch.from_numpy(np.asarray(arrays["x_hat"])), weight)
                    self.resyncs += 1
                continue
            self.record_delay(letter)
            if round_index is not None and letter.round != round_index:
                self.stale_messages += 1
            if weight > 0.0:
                self.core.absorb(received_message(arrays, numel, self.device), weight, letter.sender)

    def open_letters(self, letters: list[Letter]) -> list[tuple[int, dict] | None]:
        """(numel, arrays) of each letter (None when it is lost); the ones sent by reference are fetched in one
        ray.get, or one by one if that fails (a reference whose sender died is lost)."""
        refs = [letter.payload[1][0] for letter in letters if letter.payload[0] == "ref"]
        try:
            fetched = ray.get(refs, timeout=self.config.runtime.wait_timeout_s) if refs else []
        except ray.exceptions.RayError:
            fetched = []
            for ref in refs:
                try:
                    fetched.append(ray.get(ref, timeout=10))
                except (ray.exceptions.RayError, TimeoutError):
                    fetched.append(None)
        fetched_iter = iter(fetched)
        return [next(fetched_iter) if letter.payload[0] == "ref" else letter.payload[1:] for letter in letters]

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

    # ------------------------------------------------------------ failures (control group, except crash)

    def crash(self, round_index: int) -> None:
        """Fault injection: this process dies now, as a crashed one would (after telling the coordinator when)."""
        try:
            ray.get(self.coordinator.record_event.remote(
                {"kind": "fault_injected", "agent": self.agent_id, "round": round_index, "step": self.core.step,
                 "time": time.time()}), timeout=10)
        finally:
            os._exit(1)

    def announce(self) -> None:
        """A restarted agent's first letters: its whole public copy (CHOCO/AdaGossip) or a round mark (D-PSGD)
        to every out-neighbour, which then replaces what it knew of this agent."""
        with self.link_lock:
            for receiver in self.live_receivers(self.resync_receivers()):
                self.post_resync(receiver)

    def out_neighbours(self) -> list[int]:
        me = self.agent_id
        return [j for j in range(len(self.base_mixing)) if j != me and self.base_mixing[j, me] > 0]

    def resync_receivers(self) -> list[int]:
        """Who gets this agent's resync letters: its out-neighbours (CHOCO/AdaGossip: a static graph), else
        everyone (D-PSGD's round marks are tiny, and its graph may change every round)."""
        if self.core.link_copies is not None:
            return self.out_neighbours()
        return [j for j in range(len(self.base_mixing)) if j != self.agent_id]

    def post_resync(self, receiver: int) -> None:
        now = time.time()
        if self.core.link_copies is None:
            self.post(receiver, self.round_reached, "mark", None, now, now)
            return
        x_hat = self.core.public_copy()
        payload = self.wire_payload(x_hat.numel(), x_hat.numel() * x_hat.element_size(), {"x_hat": x_hat.cpu().numpy()})
        self.core.traffic.record([receiver], x_hat.numel() * x_hat.element_size())
        self.post(receiver, self.round_reached, "full", payload, now,
                  now + link_delay(x_hat.numel() * x_hat.element_size(), self.config.runtime.timing))

    @ray.method(concurrency_group="control")
    def peers_down(self, agents: list[int]) -> None:
        """The coordinator found these peers dead: stop waiting for them and sending to them."""
        for j in agents:
            self.links.close(j)
        with self.link_lock:
            for j in agents:
                self.down.add(j)
                self.mailbox.mark_down(j)
        for j in agents:
            if j in self.out_neighbours() or self.base_mixing[self.agent_id, j] > 0:
                self.event("neighbour_down", neighbour=j, round=self.round_reached)

    @ray.method(concurrency_group="control")
    def peer_restarted(self, agent: int, handle: Any, incarnation: int) -> None:
        """Peer `agent` came back as `handle`: start a new stream to it with this agent's whole public copy."""
        self.links.close(agent)
        with self.link_lock:
            if incarnation <= self.peer_incarnation.get(agent, 0):
                return
            self.peer_incarnation[agent] = incarnation
            self.peers[agent] = handle
            self.sent_seq[agent] = 0
            self.down.discard(agent)
            if agent in self.resync_receivers():
                self.post_resync(agent)
                if self.finished_loop:
                    self.post(agent, self.plan.total_rounds, "fin", None, time.time(), 0.0)

    @ray.method(concurrency_group="control")
    def peer_dropped(self, agent: int) -> None:
        """Peer `agent` is gone for good: remove it from s and give its weight to this agent's self weight."""
        self.links.close(agent)
        with self.link_lock:
            self._forget(agent)

    def _forget(self, agent: int) -> None:
        if agent in self.dropped:
            return
        self.dropped.add(agent)
        self.down.add(agent)
        self.mailbox.mark_down(agent, gone=True)
        weight = float(self.base_mixing[self.agent_id, agent])
        if weight > 0.0:
            self.dropped_weight += weight
            if self.core.link_copies is not None:
                self.core.drop_link(agent, weight)

    @ray.method(concurrency_group="control")
    def restore_snapshot(self, snapshot: tuple[dict[str, np.ndarray], dict]) -> int:
        """Continue from a snapshot (tensors, meta) the coordinator kept (a restarted agent, before it runs)."""
        tensors, meta = snapshot
        with self.link_lock:
            self.core.restore({k: torch.from_numpy(np.array(v)) for k, v in tensors.items()}, meta)
            if self.core.link_copies is not None:  # the snapshot may predate drops this agent already knows of
                for j in self.dropped:
                    self.core.drop_link(j, float(self.base_mixing[self.agent_id, j]))
        self.round_reached = self.core.step // self.plan.local_steps - 1
        return self.core.step

    @ray.method(concurrency_group="control")
    def position(self) -> int:
        return self.core.step

    def checkpoint_barrier(self, step: int) -> None:
        """Give the coordinator this agent's state after `step`, then wait until it wrote the run's checkpoint
        (nobody sends the next round's messages before every agent's state is in: a consistent cut)."""
        arrays, meta = self.snapshot_arrays()
        self.barrier.clear()
        self.barrier_step = step
        self.outstanding.append(self.coordinator.keep_checkpoint.remote(
            self.agent_id, self.incarnation, step, arrays, meta))
        deadline = time.time() + self.config.runtime.wait_timeout_s
        while not self.barrier.wait(0.2):
            if self.stop_requested.is_set():
                return
            if time.time() > deadline:
                self.event("checkpoint_timeout", step=step + 1)
                return

    @ray.method(concurrency_group="control")
    def release(self, step: int) -> None:
        """The coordinator wrote the checkpoint of `step`: the loop goes on (a late release of an earlier
        checkpoint, after this agent gave up waiting for it, is ignored)."""
        if step == self.barrier_step:
            self.barrier.set()

    def keep_snapshot(self) -> None:
        """Keep this agent's whole state where its death does not lose it, to restart from. On the coordinator's
        node: a file in shared memory, which the coordinator reads only if it restarts this agent (no call, one
        copy). From another node: sent to the coordinator, which copies it (it survives the loss of this node)."""
        if self.snapshot_dir is not None:
            with self.link_lock:
                tensors, meta = self.core.snapshot()
            try:
                write_snapshot(self.snapshot_dir, self.agent_id, tensors, meta)
                return
            except OSError as error:  # shared memory full, say: from now on by value
                self.event("snapshot_file_failed", error=str(error))
                self.snapshot_dir = None
        self.outstanding.append(self.coordinator.keep_snapshot.remote(self.agent_id, self.incarnation,
                                                                      *self.snapshot_arrays()))

    def snapshot_arrays(self) -> tuple[dict[str, np.ndarray], dict]:
        """AgentCore.snapshot() as numpy arrays, taken while no resync or drop changes the rule state."""
        with self.link_lock:
            tensors, meta = self.core.snapshot()
        return {k: v.numpy() for k, v in tensors.items()}, meta

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
            self.agent_id, step, accuracy, [state], self.core.take_mean_loss(), self.traffic_counts(), self.incarnation))

    def traffic_counts(self) -> dict:
        traffic = self.core.traffic
        return {"bytes_sent": traffic.bytes_sent, "messages_sent": traffic.messages_sent,
                "per_link": dict(traffic.per_link), "per_link_messages": dict(traffic.per_link_messages)}

    def stats(self) -> dict:
        delays = {j: {"count": len(v), "min_s": min(v), "mean_s": float(np.mean(v)), "max_s": max(v)}
                  for j, v in self.link_delays.items() if v}
        return {"agent": self.agent_id, "incarnation": self.incarnation, "steps": self.core.step,
                "waited_s": self.waited_s, "timeouts": self.timeouts, "stale_messages": self.stale_messages,
                "lost_messages": self.lost_messages, "resyncs": self.resyncs, "link_delays": delays,
                "phase_s": dict(self.phases.wall),
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
        with self.link_lock:
            out = {name: t.cpu().numpy().copy() for name, t in self.core.state.tensors().items()}
            out.update({f"link.{j}": t.cpu().numpy().copy() for j, t in (self.core.link_copies or {}).items()})
            out["params"] = self.core.parameters_vector().cpu().numpy()
        return out

    @ray.method(concurrency_group="control")
    def drain(self, timeout_s: float) -> int:
        """After the run: once every live in-neighbour's final letter arrived, absorb every message still queued."""
        row = self.base_mixing[self.agent_id]
        senders = [j for j in range(len(row)) if j != self.agent_id and row[j] > 0 and j not in self.dropped]
        deadline = time.time() + timeout_s
        for j in senders:
            for letter in self.links.pull(j, lambda: self.mailbox.absent(j), deadline):
                self.accept(letter)
        self.mailbox.wait_until(
            lambda now: all(j in self.mailbox.finished for j in senders)
            and all(letter.available_at <= now for q in self.mailbox.queues.values() for letter in q),
            deadline,
        )
        taken = [letter for sender in sorted(self.mailbox.queues) for letter in self.mailbox.take_ready(sender)
                 if letter.kind in ("q", "full")]
        if self.config.gossip.rule == "dpsgd":
            return len(taken)
        with self.link_lock:
            self.apply_letters(taken, {j: float(row[j]) for j in senders}, None)
        return len(taken)

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
        return (accuracy, [ray.put(self.state_arrays())], self.core.take_mean_loss(), self.traffic_counts(),
                self.incarnation)


def split_state(arrays: dict[str, np.ndarray]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    params = torch.from_numpy(np.array(arrays["params"]))
    buffers = {k[len("buffer."):]: torch.from_numpy(np.array(v)) for k, v in arrays.items() if k.startswith("buffer.")}
    return params, buffers


def spawn_agent(recipe: dict, agent: int, incarnation: int = 0) -> Any:
    """Create agent `agent`'s actor in its placement-group bundle (also how a dead one is replaced)."""
    options: dict[str, Any] = {"num_cpus": recipe["cpus"], "num_gpus": recipe["gpus"], "runtime_env": recipe["env"],
                               "max_restarts": 0}
    if recipe["group"] is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            recipe["group"], placement_group_bundle_index=agent)
    return AgentActor.options(**options).remote(
        agent, recipe["config"], recipe["data"], recipe["shards"][agent], recipe["steps_per_epoch"],
        recipe["factors"][agent], recipe["threads"], incarnation)


def copied_state(arrays: dict[str, np.ndarray], meta: dict) -> tuple[dict[str, np.ndarray], dict]:
    """An agent's state as this process's own copy (the arrays may live in memory the agent's process owns)."""
    return {k: np.array(v, copy=True) for k, v in arrays.items()}, meta


def traffic_of(counts: dict) -> Traffic:
    return Traffic(counts["bytes_sent"], counts["messages_sent"])


@ray.remote(concurrency_groups={"report": 1, "control": 2})
class Coordinator:
    """Owns the plan and the run's clock; starts the agents, gathers evaluations, keeps the agents' snapshots,
    replaces or drops agents that die (runtime.on_failure), performs the final merge."""

    def __init__(self, config_dict: dict, data: list, steps_per_epoch: int) -> None:
        pin_threads(1)
        self.config: Config = from_dict(Config, config_dict)
        dataset, test_x, test_y = dataset_from_numpy(ray.get(data[0]))
        topology = build_topology(self.config.topology.name, self.config.agents.count, self.config.topology.weights,
                                  self.config.topology.params)
        self.plan = RunPlan(self.config, topology, steps_per_epoch)
        setup = RunSetup(self.config, dataset, [], topology, self.plan, test_x, test_y, {})
        self.merged = MergedModel(setup)
        n = self.config.agents.count
        self.agents: list[Any] = []
        self.recipe: dict = {}
        self.runs: dict[int, Any] = {}
        self.incarnations = [0] * n
        self.restarts = [0] * n
        self.dropped: set[int] = set()
        self.snapshots: dict[int, tuple[dict[str, np.ndarray], dict]] = {}  # sent by value (see latest_snapshot)
        runtime = self.config.runtime
        self.snapshot_dir: tuple[str, str] | None = None  # (this node, directory): agents on it write snapshots there
        if runtime.on_failure == "restart" and runtime.snapshot_every:
            self.snapshot_dir = (ray.get_runtime_context().get_node_id(), make_snapshot_dir())
        self.failures: list[dict] = []
        self.aborted: dict | None = None
        self.restart_queue: list[tuple[int, float]] = []  # (agent, when its death was detected)
        self.restarting: set[int] = set()
        self.restart_worker: threading.Thread | None = None
        self.stopping = False
        self.comm_counted = (0, 0)  # (rounds, how many of them communicate)
        self.pending: dict[int, dict[int, tuple]] = {}
        self.recorded: set[int] = set()
        self.records: list[dict] = []  # by step
        self.delivered: list[dict] = []  # the same, in the order they were completed
        self.record_lock = threading.Lock()
        self.events: list[dict] = []
        self.condition = threading.Condition()
        self.started = time.time()
        self.finished: list[dict] | None = None
        self.checkpoint_dir: str | None = None
        self.arrivals: dict[int, dict[int, tuple]] = {}  # checkpoint step -> agent -> (arrays, meta)
        self.before: dict = {"records": [], "events": []}  # what a resumed run did before its checkpoint
        self.resumed_from = 0

    @ray.method(concurrency_group="control")
    def ready(self) -> bool:
        return True

    @ray.method(concurrency_group="control")
    def snapshot_place(self) -> tuple[str, str] | None:
        """(node, directory) where the agents on this actor's node write their snapshots; None without snapshots."""
        return self.snapshot_dir

    @ray.method(concurrency_group="control")
    def remove_snapshots(self) -> None:
        if self.snapshot_dir is not None:
            shutil.rmtree(self.snapshot_dir[1], ignore_errors=True)

    @ray.method(concurrency_group="control")
    def start(self, agents: list[Any], recipe: dict, checkpoint_dir: str | None = None,
              resumed: dict | None = None) -> None:
        """Start every agent's own loop; returns at once (the loops run in the agents).

        resumed: the checkpoint's run state (records, events, wall time, dropped agents) when resuming."""
        self.agents = list(agents)
        self.recipe = recipe
        self.checkpoint_dir = checkpoint_dir
        self.started = time.time()
        if resumed is not None:
            self.before = {"records": list(resumed.get("record_list", [])), "events": list(resumed["events"])}
            self.resumed_from = int(resumed["step"])
            self.started = time.time() - float(resumed["wall_time_s"])  # the run's clock goes on
            self.event("resumed", step=self.resumed_from)
            for i in resumed.get("dropped", []):
                self.dropped.add(i)
                ray.kill(self.agents[i])
                self.gather([self.agents[j].peer_dropped.remote(i) for j in self.live()])
        resync = resumed is not None and self.config.runtime.mode != "sync"  # in-flight messages were not saved
        checkpoints = checkpoint_dir is not None
        self.runs = {i: self.agents[i].run.remote(checkpoints, resync) for i in self.live()}
        self.event("run_started", agents=len(self.runs))

    def gather(self, refs: list[Any]) -> list[Any]:
        """Results of calls to agents, None for an agent that died meanwhile (its own run reference tells the
        supervision loop, which handles it next) or that did not answer within runtime.wait_timeout_s."""
        deadline = time.time() + self.config.runtime.wait_timeout_s
        out = []
        for ref in refs:
            try:
                out.append(ray.get(ref, timeout=max(0.1, deadline - time.time())))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                out.append(None)
        return out

    def live(self, exclude: set[int] | list[int] = ()) -> list[int]:
        return [i for i in range(len(self.agents)) if i not in self.dropped and i not in exclude]

    @ray.method(concurrency_group="control")
    def wait_finished(self, stall_s: float) -> dict:
        """Wait for the agents' loops, handling deaths as runtime.on_failure says; in bounded/async mode, once a
        quorum finished, stop the rest. Returns the finished agents' stats and whether the run was aborted.

        Restarts run in another thread, so a death is detected (and the neighbours told) within a fraction of a
        second even while another agent is being restarted. A run may take as long as it needs: every `stall_s`
        seconds without a finished loop the agents' steps are read, and a run in which no agent took a step
        since the last look is stopped as aborted (reason: stalled)."""
        n = len(self.runs)
        deadline = time.time() + stall_s
        positions: dict[int, int] | None = None
        quorum = n if self.config.runtime.mode == "sync" else max(1, math.ceil(self.config.runtime.finish_quorum * n))
        stats: dict[int, dict] = {}
        while self.aborted is None:
            with self.condition:
                waiting = {ref: i for i, ref in self.runs.items()
                           if i not in stats and i not in self.dropped and i not in self.restarting}
                restarting = bool(self.restarting)
                if not waiting and restarting:
                    self.condition.wait(timeout=0.5)
                    continue
            if not waiting:
                break
            ready, _ = ray.wait(list(waiting), num_returns=1,
                                timeout=0.5 if restarting else max(0.0, deadline - time.time()))
            if not ready:
                if restarting or time.time() < deadline:
                    continue
                ids = sorted(waiting.values())
                now = dict(zip(ids, self.gather([self.agents[i].position.remote() for i in ids])))
                if now != positions:  # some agent moved (or this is the first look): not a stall
                    positions, deadline = now, time.time() + stall_s
                    continue
                self.aborted = {"agents": [], "field": "runtime.wait_timeout_s",
                                "reason": f"the run stalled: none of the {len(ids)} unfinished agents took a step in "
                                          f"{stall_s:g} s (raise runtime.wait_timeout_s if one step takes longer)"}
                self.event("run_stalled", agents=ids, steps=[now[i] for i in ids])
                break
            ready, _ = ray.wait(list(waiting), num_returns=len(waiting), timeout=0)
            failed = []
            for ref in ready:
                try:
                    stats[waiting[ref]] = ray.get(ref)
                except ray.exceptions.RayActorError as error:
                    failed.append((waiting[ref], error))
            if failed:
                self.handle_failures(failed)
            if not self.stopping and self.aborted is None and len(stats) >= quorum and len(stats) < len(self.live()):
                self.stopping = True
                stopped = [i for i in self.live() if i not in stats]
                steps = self.gather([self.agents[i].stop.remote() for i in stopped])
                self.event("quorum_finished", finished=len(stats), stopped=stopped, stopped_at_steps=steps)
        if self.aborted is not None:
            stats.update(self.stop_all(exclude=set(stats)))
        else:
            self.complete_pending()
        ordered = [stats[i] for i in sorted(stats)]
        self.event("agents_finished", steps=[s["steps"] for s in ordered])
        with self.condition:
            self.finished = ordered
            self.condition.notify_all()  # a waiting poll returns at once
        return {"stats": ordered, "aborted": self.aborted}

    def stop_all(self, exclude: set[int]) -> dict[int, dict]:
        """Abort: stop every live agent and collect the stats of those whose loop ends in time."""
        alive = self.live(set(exclude) | set(self.aborted["agents"]))
        for i in alive:
            self.agents[i].stop.remote()
        out = {}
        for i in alive:
            try:
                out[i] = ray.get(self.runs[i], timeout=self.config.runtime.wait_timeout_s)
            except (ray.exceptions.RayError, TimeoutError):
                pass
        return out

    # ------------------------------------------------------------ failures

    def handle_failures(self, failed: list[tuple[int, Exception]]) -> None:
        """Agents whose actor died: record it, tell the others, then restart, drop or abort (runtime.on_failure)."""
        detected = time.time()
        ids = [i for i, _ in failed]
        policy = self.config.runtime.on_failure
        injected = {e["agent"]: e for e in self.events if e["kind"] == "fault_injected"}
        for i, error in failed:
            record = {"agent": i, "incarnation": self.incarnations[i], "error": type(error).__name__,
                      "detected_at_s": detected - self.started, "policy": policy}
            if i in injected and self.incarnations[i] == 0:  # injected kills happen in the first life only
                record["injected_round"] = injected[i]["round"]
                record["detection_s"] = detected - self.started - injected[i]["time_s"]
            self.failures.append(record)
            self.event("agent_failed", **{k: v for k, v in record.items() if k != "policy"})
        if policy == "abort":
            self.aborted = {"agents": ids, "reason": f"agent {ids[0]} died and runtime.on_failure is abort"}
            self.event("run_aborted", agents=ids)
            return
        others = self.live(exclude=ids)
        self.gather([self.agents[j].peers_down.remote(ids) for j in others])
        restart = [i for i in ids if policy == "restart" and self.restarts[i] < self.config.runtime.max_restarts]
        for i in ids:
            if i not in restart:
                self.drop(i, reason="on_failure is drop" if policy == "drop" else "max_restarts reached")
        if restart:
            with self.condition:
                self.restart_queue.extend((i, detected) for i in restart)
                self.restarting.update(restart)
                if self.restart_worker is None:
                    self.restart_worker = threading.Thread(target=self.restart_loop, daemon=True)
                    self.restart_worker.start()
        if not self.live():
            self.aborted = {"agents": ids, "reason": "every agent was dropped"}

    def drop(self, agent: int, reason: str) -> None:
        with self.condition:
            self.dropped.add(agent)
            self.runs.pop(agent, None)
        others = self.live()
        self.gather([self.agents[j].peer_dropped.remote(agent) for j in others])
        self.event("agent_dropped", agent=agent, reason=reason, agents_left=len(others))
        for record in self.failures:
            if record["agent"] == agent and "action" not in record:
                record["action"] = "dropped"
        with self.condition:
            complete = [step for step, reports in self.pending.items() if set(reports) >= set(others)]
            barriers = [step for step, arrived in self.arrivals.items() if set(arrived) >= set(others)]
        for step in complete:
            self.finish_record(step)
        for step in barriers:
            threading.Thread(target=self.write_checkpoint, args=(step,), daemon=True).start()

    def restart_loop(self) -> None:
        """The restart thread: restart the queued agents, a batch at a time, until none is left."""
        while True:
            with self.condition:
                if not self.restart_queue:
                    self.restart_worker = None
                    return
                batch, self.restart_queue = self.restart_queue, []
            ids = [i for i, _ in batch]
            try:
                self.restart(ids, min(t for _, t in batch))
            finally:
                with self.condition:
                    self.restarting.difference_update(ids)
                    self.condition.notify_all()

    def restart(self, ids: list[int], detected: float) -> None:
        """New actors for `ids`, from their latest snapshots; every live peer resends its public copy to them."""
        others = self.live(exclude=ids)
        frontier = [p for p in self.gather([self.agents[j].position.remote() for j in others]) if p is not None] or [0]
        new = {}
        for i in ids:
            self.incarnations[i] += 1
            self.restarts[i] += 1
            new[i] = self.agents[i] = spawn_agent(self.recipe, i, self.incarnations[i])
        peers = {j: self.agents[j] for j in self.live()}
        me = ray.get_runtime_context().current_actor
        with self.condition:  # peers that are dead and not yet back: the new agents must not wait for them
            down = sorted((self.restarting | {j for j, _ in self.restart_queue}) - set(ids))
        deadline = time.time() + self.config.runtime.wait_timeout_s
        connected = {i: new[i].connect.remote(peers, me, self.snapshot_dir, dict(enumerate(self.incarnations)),
                                              sorted(self.dropped), down)
                     for i in ids}
        placed, restored, sources = {}, {}, {}
        for i in ids:  # one new agent that fails to start is dropped; the others of its batch go on
            try:
                placed[i] = ray.get(connected[i], timeout=max(0.1, deadline - time.time()))
                snapshot, sources[i] = self.latest_snapshot(i)
                restored[i] = ray.get(new[i].restore_snapshot.remote(snapshot),
                                      timeout=max(0.1, deadline - time.time())) if snapshot is not None else 0
            except (ray.exceptions.RayError, TimeoutError) as error:
                ray.kill(new[i])
                self.event("restart_failed", agent=i, error=type(error).__name__)
                self.drop(i, reason=f"restart failed ({type(error).__name__})")
        ids = [i for i in ids if i in restored]
        if not ids:
            return
        self.gather([self.agents[j].peer_restarted.remote(i, new[i], self.incarnations[i]) for j in others for i in ids])
        with self.condition:
            for i in ids:
                self.runs[i] = new[i].run.remote(self.checkpoint_dir is not None)
        if self.stopping:  # a bounded/async run's quorum already finished
            self.gather([new[i].stop.remote() for i in ids])
        recovered = time.time()
        rejoined_at = [p for p in self.gather([self.agents[j].position.remote() for j in others]) if p is not None] or frontier
        local = self.plan.local_steps
        failed_at = {r["agent"]: r["injected_round"] for r in self.failures if "injected_round" in r and "action" not in r}
        for i in ids:
            info = placed[i]
            restored_round = restored[i] // local
            died_round = failed_at.get(i, int(np.median(frontier)) // local)  # injected, else the others' round
            facts = {"restored_step": restored[i], "snapshot": sources[i],
                     "rounds_lost": max(0, died_round - restored_round),
                     "rounds_behind": max(0, int(np.median(rejoined_at)) // local - restored_round),
                     "recovery_s": recovered - detected, "node": info["node"]}
            for record in self.failures:
                if record["agent"] == i and "action" not in record:
                    record.update(action="restarted", **facts)
            self.event("agent_restarted", agent=i, incarnation=self.incarnations[i], **facts)

    def latest_snapshot(self, agent: int) -> tuple[tuple[dict[str, np.ndarray], dict] | None, str | None]:
        """The newer, by step, of the agent's snapshot file (it ran on this node) and the snapshot it sent (it
        ran elsewhere, or a resumed run's checkpoint), and which it was ("file" or "sent"); (None, None)
        when there is neither."""
        kept = [(self.snapshots.get(agent), "sent")]
        if self.snapshot_dir is not None:
            kept.append((read_snapshot(self.snapshot_dir[1], agent), "file"))
        kept = [(snapshot, source) for snapshot, source in kept if snapshot is not None]
        return max(kept, key=lambda pair: pair[0][1]["step"]) if kept else (None, None)

    @ray.method(concurrency_group="report")
    def keep_snapshot(self, agent: int, incarnation: int, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """An agent's latest state, copied (the arrays may live in memory its process owns)."""
        if incarnation == self.incarnations[agent]:
            self.snapshots[agent] = copied_state(arrays, meta)

    # ------------------------------------------------------------ whole-run checkpoints

    @ray.method(concurrency_group="report")
    def keep_checkpoint(self, agent: int, incarnation: int, step: int, arrays: dict[str, np.ndarray], meta: dict) -> None:
        """One agent's state at a checkpoint step; once every live agent's is in, write the checkpoint."""
        if incarnation != self.incarnations[agent]:
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
            self.condition.wait_for(lambda: all(s in self.recorded or s in done_before for s in evaluated),
                                    timeout=self.config.runtime.wait_timeout_s)
            records = self.before["records"] + [r for r in self.records if r["step"] <= step + 1]
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
        }
        save_checkpoint(self.checkpoint_dir, self.config, run_state, agents)
        for i in self.live():
            self.agents[i].release.remote(step)

    @ray.method(concurrency_group="control")
    def live_agents(self) -> dict[int, Any]:
        return {i: self.agents[i] for i in self.live()}

    @ray.method(concurrency_group="control")
    def failure_report(self) -> dict:
        return {"failures": list(self.failures), "restarts": sum(self.restarts), "dropped_agents": sorted(self.dropped)}

    # ------------------------------------------------------------ records

    def complete_pending(self) -> None:
        """Records of steps some agents never reached (they were stopped): fill in their final state."""
        with self.condition:
            steps = sorted(self.pending)
        if not steps:
            return
        live = self.live()
        late = {i: r for i, r in zip(live, self.gather([self.agents[i].late_report.remote() for i in live])) if r is not None}
        for step in steps:
            for agent, report in late.items():
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
    def report(self, agent: int, step: int, accuracy: float | None, state: list, loss: float, traffic: dict,
               incarnation: int = 0) -> None:
        """An agent's evaluation at `step`; once every live agent reported that step, build the network record.
        A restarted agent reports steps again: those already recorded are ignored, and a dead life's late report
        never replaces a newer life's."""
        with self.condition:
            if step in self.recorded or agent in self.dropped or step < self.resumed_from:
                return
        try:  # copied now: the object dies with its owner, the agent, which may die before the record is complete
            arrays = {k: np.array(v, copy=True) for k, v in ray.get(state[0]).items()}
        except ray.exceptions.RayError:
            return  # the agent died; a restarted one reports this step again
        with self.condition:
            earlier = self.pending.get(step, {}).get(agent)
            if earlier is not None and earlier[4] > incarnation:
                return
            self.pending.setdefault(step, {})[agent] = (accuracy, arrays, loss, traffic, incarnation)
            complete = set(self.pending[step]) >= set(self.live())
        if complete:
            self.finish_record(step)

    def finish_record(self, step: int) -> None:
        with self.condition:
            if step in self.recorded or step not in self.pending:
                return
            self.recorded.add(step)
            reports = self.pending.pop(step)
        with self.record_lock:  # the report thread, the supervision loop and the restart thread all get here
            self._finish_record(step, reports)

    def _finish_record(self, step: int, reports: dict[int, tuple]) -> None:
        order = [i for i in sorted(reports) if i not in self.dropped]
        states = [split_state(reports[i][1]) for i in order]
        vectors = [params for params, _ in states]
        self.merged.load(global_average(vectors), average_buffers([buffers for _, buffers in states]))
        accuracies = [reports[i][0] for i in order]
        rounds_done = (step + 1) // self.plan.local_steps
        record = network_record(
            step=step, plan=self.plan, vectors=vectors,
            local_accuracies=None if accuracies[0] is None else accuracies,
            merged_accuracy=self.merged.evaluate(), traffic=[traffic_of(reports[i][3]) for i in order],
            train_loss=float(np.mean([reports[i][2] for i in order])), rounds_done=rounds_done,
            communication_rounds=self.communication_rounds(rounds_done),
            wall_time_s=time.time() - self.started,
        )
        if self.dropped:
            record["agents"] = order
        with self.condition:
            self.delivered.append(record)  # in the order they were made: poll hands them out by position
            self.records.append(record)
            self.records.sort(key=lambda r: r["step"])
            self.condition.notify_all()

    def communication_rounds(self, rounds_done: int) -> int:
        """How many of the first `rounds_done` rounds communicate (counted once, extended as the run goes)."""
        with self.condition:
            counted, count = self.comm_counted
            for r in range(counted, rounds_done):
                count += self.plan.round_plan(r) is not None
            if rounds_done >= counted:
                self.comm_counted = (rounds_done, count)
                return count
        return sum(self.plan.round_plan(r) is not None for r in range(rounds_done))  # an earlier step (rare)

    @ray.method(concurrency_group="control")
    def poll(self, seen: int, timeout_s: float) -> tuple[list[dict], bool]:
        """(records after the first `seen`, whether the agents finished), waiting up to timeout_s for either."""
        with self.condition:
            if len(self.delivered) <= seen and self.finished is None:
                self.condition.wait(timeout=timeout_s)
            return list(self.delivered[seen:]), self.finished is not None

    # ------------------------------------------------------------ the end

    def gather_states(self) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        return [split_state(s) for s in ray.get([self.agents[i].get_state.remote() for i in self.live()])]

    @ray.method(concurrency_group="control")
    def merged_state(self) -> dict[str, np.ndarray]:
        """The exact average of the live agents' models, without sending it back (final merge off)."""
        states = self.gather_states()
        self.merged.load(global_average([p for p, _ in states]), average_buffers([b for _, b in states]))
        return {k: v.numpy() for k, v in self.merged.state_dict().items()}

    @ray.method(concurrency_group="control")
    def final_merge(self) -> dict:
        """Gather every live agent's parameters, average exactly, send the average back, re-estimate batch norm."""
        spec = self.config.schedule.final_merge
        live = [self.agents[i] for i in self.live()]
        states = self.gather_states()
        average = global_average([params for params, _ in states])
        buffers = average_buffers([b for _, b in states])
        arrays = {"params": average.numpy(), **{f"buffer.{k}": v.numpy() for k, v in buffers.items()}}
        ref = ray.put(arrays)
        ray.get([agent.load_state.remote([ref]) for agent in live])
        self.merged.load(average, buffers)
        if spec.bn == "local":
            estimates = ray.get([agent.reestimate_batchnorm.remote(spec.bn_batches) for agent in live])
            merged_buffers = average_buffers([split_state({"params": arrays["params"], **e})[1] for e in estimates])
            self.merged.load(average, merged_buffers)
        elif spec.bn == "global":  # the global sample comes from the full train set
            self.merged.reestimate_on_global_sample(spec.bn_batches, self.config.seed)
            new = {f"buffer.{k}": v.detach().cpu().numpy() for k, v in self.merged.model.named_buffers()}
            ref = ray.put({"params": arrays["params"], **new})
            ray.get([agent.load_state.remote([ref]) for agent in live])
        accuracy = self.merged.evaluate()
        self.event("merge_done", merged_test_accuracy=accuracy, bn=spec.bn, agents=len(live))
        return {"merged_accuracy": accuracy, "state_dict": {k: v.numpy() for k, v in self.merged.state_dict().items()}}

    @ray.method(concurrency_group="control")
    def get_events(self) -> list[dict]:
        with self.condition:
            return self.before["events"] + sorted(self.events, key=lambda e: e["time_s"])

    @ray.method(concurrency_group="control")
    def consensus(self) -> float:
        return consensus_distance([p for p, _ in self.gather_states()])
