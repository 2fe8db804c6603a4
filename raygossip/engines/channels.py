"""Shared-memory links between agents on one node: one Ray object-store channel per directed link."""

from __future__ import annotations

import os
import pickle
import select
import tempfile
import time
import uuid
from typing import Any, Callable, Iterator

from ray.exceptions import RayChannelError, RayChannelTimeoutError

try:  # an experimental Ray API: a Ray without it sends every letter by call
    from ray.experimental.channel.shared_memory_channel import BufferedSharedMemoryChannel
except ImportError:  # pragma: no cover - depends on the installed Ray
    BufferedSharedMemoryChannel = None

BUFFERS = 3  # letters a writer may be ahead of its reader's reads before a write waits
ENVELOPE_BYTES = 65536  # a channel's room beyond the dense message: the letter's other fields, a compressor's indices
SLICE_S = 0.05  # a blocked read or write looks this often whether its link was closed or its deadline passed
SEMAPHORE_DIR = "/dev/shm"  # where Linux keeps named semaphores (Ray's channels make two per buffer)


def named_semaphores() -> set[str]:
    """The named semaphores of this machine (empty where they are not files in SEMAPHORE_DIR)."""
    try:
        return {name for name in os.listdir(SEMAPHORE_DIR) if name.startswith("sem.")}
    except OSError:
        return set()


def available() -> bool:
    """Whether this Ray has the channels and this platform the named pipes the doorbells need."""
    return BufferedSharedMemoryChannel is not None and hasattr(os, "mkfifo")


class ChannelLinks:
    """One agent's channel ends, by peer. A link is closed for good when its peer dies or is replaced; letters
    then travel by actor call (`write` returns False and the caller sends it that way).

    Ray's channel read spins while it waits (a core's worth of CPU taken from the agents that compute), so
    each link also has a doorbell, a named pipe: the writer rings it once per letter and the reader sleeps
    in select() until it rings, then reads a letter that is already there. The pipe's path is unlinked as
    soon as both ends have it open, and so are the names of the channel's semaphores (`seal`): Ray removes
    them only when a process that opened them exits by itself, and agent actors are killed. A letter travels
    pickled (Ray's own serialisation of a tuple holding arrays costs several times more here), so what a
    read returns is this process's own copy. `closed` is written by the control thread and read by the
    training thread without a lock."""

    def __init__(self) -> None:
        self.out: dict[int, tuple[Any, int]] = {}  # receiver -> (channel, doorbell fd)
        self.inbound: dict[int, tuple[Any, int]] = {}  # sender -> (channel, doorbell fd)
        self.closed: set[int] = set()
        self.semaphores: set[str] = set()  # the named semaphores `open` made, until `seal` unlinks them

    def open(self, me: Any, readers: dict[int, tuple[Any, str]], size_bytes: int) -> dict[int, tuple[Any, str]]:
        """Create this writer's channel and doorbell to each reader (actor handle, node id); returns
        (channel, doorbell path) by reader, for `attach`."""
        made = {}
        before = named_semaphores()
        for receiver, (handle, node) in readers.items():
            channel = BufferedSharedMemoryChannel(me, [(handle, node)], BUFFERS, size_bytes)
            channel.ensure_registered_as_writer()
            path = os.path.join(tempfile.gettempdir(), f"raygossip-bell-{uuid.uuid4().hex}")
            os.mkfifo(path, 0o600)
            self.out[receiver] = (channel, os.open(path, os.O_RDWR | os.O_NONBLOCK))
            made[receiver] = (channel, path)
        self.semaphores |= named_semaphores() - before
        return made

    def seal(self) -> None:
        """Unlink the names of the semaphores `open` made, once every reader has attached (opened them): they
        live on in the processes that have them open and vanish with the last of them, killed or not. A
        channel that grows later (a letter larger than it) makes new ones, which stay until Ray removes them."""
        for name in self.semaphores:
            try:
                os.unlink(os.path.join(SEMAPHORE_DIR, name))
            except FileNotFoundError:
                pass
        self.semaphores.clear()

    def attach(self, inbound: dict[int, tuple[Any, str]]) -> None:
        for sender, (channel, path) in inbound.items():
            channel.ensure_registered_as_reader()
            self.inbound[sender] = (channel, os.open(path, os.O_RDWR | os.O_NONBLOCK))
            os.unlink(path)

    def close(self, peer: int) -> None:
        self.closed.add(peer)

    def write(self, receiver: int, letter: tuple, deadline: float) -> bool:
        """Write a letter to `receiver`'s channel; False when there is none (any more): send it by call."""
        channel, bell = self.out.get(receiver, (None, -1))
        while channel is not None and receiver not in self.closed:
            try:
                channel.write(pickle.dumps(letter, protocol=5), timeout=SLICE_S)
                os.write(bell, b"\0")
                return True
            except RayChannelTimeoutError:
                if time.time() >= deadline:
                    break
            except RayChannelError:
                break
        if self.out.pop(receiver, None) is not None:
            os.close(bell)
        return False

    def pull(self, sender: int, satisfied: Callable[[], bool], deadline: float,
             stopped: Callable[[], bool] = lambda: False) -> Iterator[tuple]:
        """Letters from `sender`'s channel, in order, until satisfied(), the deadline, a stop or the link closes."""
        channel, bell = self.inbound.get(sender, (None, -1))
        while channel is not None and not satisfied() and not stopped():
            if sender in self.closed:
                self.inbound.pop(sender, None)
                os.close(bell)
                return
            now = time.time()
            if not select.select([bell], [], [], max(0.0, min(SLICE_S, deadline - now)))[0]:
                if now >= deadline:
                    return
                continue
            os.read(bell, 1)
            try:
                letter = channel.read(timeout=max(SLICE_S, deadline - now))  # there: the writer rang after writing
            except RayChannelTimeoutError:
                return
            except RayChannelError:
                self.inbound.pop(sender, None)
                os.close(bell)
                return
            yield pickle.loads(letter)

