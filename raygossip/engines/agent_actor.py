"""The agent actor: a thin Ray shell around AgentCore that moves its messages (calls, channels, snapshots)."""

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
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from raygossip.algorithms.compressors import Compressed
from raygossip.algorithms.topology import build_topology
from raygossip.config import Config, from_dict
from raygossip.core.agent import AgentCore
from raygossip.core.faults import MessageFate, kill_schedule
from raygossip.core.plan import RunPlan
from raygossip.core.timing import StepClock, link_delay
from raygossip.data.datasets import Dataset, Split
from raygossip.engines.channels import ENVELOPE_BYTES, ChannelLinks
from raygossip.engines.mailbox import Letter, Mailbox
from raygossip.engines.snapshots import write_snapshot

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
        # D-PSGD in bounded/async mode: a sender with nothing new in a round counts with its last model (absorb_ready)
        self.reuse_last_models = self.config.gossip.rule == "dpsgd" and runtime.mode != "sync"
        self.last_models: dict[int, tuple[int, dict]] = {}  # sender -> (numel, arrays) of its last model
        self.reused_models = 0  # rounds in which a sender's last model counted again (absorb_ready)
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
        """Absorb every readable letter (rounds <= round_index in sync mode), in order per sender.

        D-PSGD in bounded and async mode: a sender of this round with nothing new (it is slower, or its loop has
        ended) counts with the last model it sent, so that the agent keeps mixing instead of taking local steps
        alone (which pulls it towards its own shard: the last rounds of a run whose neighbours finished)."""
        up_to = round_index if self.config.runtime.mode == "sync" else None
        rule_is_dpsgd = self.config.gossip.rule == "dpsgd"
        weights = dict(round_plan.weights.get(self.agent_id, (1.0, {}))[1])
        if not rule_is_dpsgd:
            weights = self.base_weights  # CHOCO/AdaGossip need a static graph
        taken: list[Letter] = []
        quiet: list[int] = []  # D-PSGD, bounded/async: this round's senders with no new model
        for sender in sorted(set(senders) | set(self.mailbox.queues)):
            letters = self.mailbox.take_ready(sender, up_to)
            self.lost_messages += sum(letter.kind == "lost" for letter in letters)
            if rule_is_dpsgd:
                letters = [letter for letter in letters if letter.kind == "q"][-1:]  # a full model: the newest counts
                if not letters and self.reuse_last_models and sender in senders:
                    quiet.append(sender)
            taken.extend(letter for letter in letters if letter.kind in ("q", "full"))
        with self.link_lock:
            self.apply_letters(taken, weights, round_index)
            for sender in quiet:
                last = self.last_models.get(sender)
                weight = weights.get(sender, 0.0)
                if last is not None and weight > 0.0 and sender not in self.down:
                    self.core.absorb(received_message(last[1], last[0], self.device), weight, sender)
                    self.reused_models += 1

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
            if self.reuse_last_models and letter.sender not in self.dropped:
                self.last_models[letter.sender] = (numel, arrays)
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
        self.last_models.pop(agent, None)
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
                "lost_messages": self.lost_messages, "resyncs": self.resyncs, "reused_models": self.reused_models,
                "link_delays": delays,
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
