"""Connecting to Ray: a local Ray bound to loopback, or the cluster at runtime.address, probed before ray.init."""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import os
import select
import socket
import subprocess
import sys

import ray
import torch

from raygossip.config import Config
from raygossip.errors import UserError

_CONFIGURED_NODE: str | None = None  # head node of the local Ray that ensure_ray started (with INLINE_LIMIT)

CONNECT_TIMEOUT_S = 3.0  # TCP connect to the head's GCS port
ANSWER_TIMEOUT_S = 3.0  # the GCS answering one question (a port that accepts but is no GCS never answers)
IMPORT_TIMEOUT_S = 20.0  # the child process that asks it importing Ray (seconds on a loaded machine)
TOKEN_FILE = "~/.ray/auth_token"
START_HINT = "start a head with `ray start --head --node-ip-address={host} --port={port}` or fix --address"
TOKEN_HINT = (f"put the head's token (`ray get-auth-token` on the head) in {TOKEN_FILE}, RAY_AUTH_TOKEN_PATH or "
              "RAY_AUTH_TOKEN, and run with RAY_AUTH_MODE=token")


def ensure_ray(config: Config) -> bool:
    """Connect to the configured cluster or start a local Ray bound to loopback; True if we started it."""
    from raygossip.engines.ray_setup import INLINE_LIMIT

    runtime = config.runtime
    if ray.is_initialized():
        return False
    if runtime.num_gpus_per_agent > 0 and runtime.address is None and not torch.cuda.is_available():
        raise UserError("runtime.num_gpus_per_agent",
                        f"{runtime.num_gpus_per_agent} asked for, but this machine has no GPU (set it to 0)")
    if runtime.address is None:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        # "local": a fresh Ray of our own, even when another one runs on this machine (ray.init() would join it).
        # Messages up to INLINE_LIMIT then travel inside the calls (see agent_actor.INLINE_BYTES).
        ray.init(address="local", num_cpus=runtime.num_cpus or os.cpu_count(), include_dashboard=False,
                 dashboard_host="127.0.0.1", log_to_driver=True, configure_logging=False,
                 _system_config={"max_direct_call_object_size": INLINE_LIMIT})
        global _CONFIGURED_NODE
        _CONFIGURED_NODE = ray.get_runtime_context().get_node_id()
    else:
        check_address(runtime.address)
        ray.init(address=runtime.address, log_to_driver=True)
    return True


def on_started_node() -> bool:
    """True when this driver runs on the local Ray that ensure_ray started (its workers inline small messages)."""
    return _CONFIGURED_NODE is not None and ray.get_runtime_context().get_node_id() == _CONFIGURED_NODE


def split_address(address: str) -> tuple[str, int] | None:
    """(host, port) of a GCS address "HOST:PORT" (or "ray://HOST:PORT"); None for "auto" and "local"."""
    if address in ("auto", "local"):
        return None
    bare = address.removeprefix("ray://")
    host, sep, port = bare.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError("runtime.address", f"expected HOST:PORT (the head's `ray start --port`, 6379 by default), "
                                           f"got {address!r}")
    return host.strip("[]"), int(port)


def check_address(address: str) -> None:
    """Fail in seconds, with one line naming the address and the fix, when the head at `address` cannot be reached
    or rejects this client's token. When the head asks for a token, RAY_AUTH_MODE is unset, the head runs on this
    machine and this machine's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) is the head's,
    token authentication is switched on for this process (Ray itself does so only for a cluster it finds by itself)."""
    parts = split_address(address)
    if parts is None:
        return
    host, port = parts
    if address.startswith("ray://") and importlib.util.find_spec("grpc") is None:
        raise UserError("runtime.address", f"{address} is a Ray Client address, which needs `pip install "
                                           "\"ray[client]\"`; or give the head's GCS address HOST:PORT (6379 by default)")
    _check_reachable(address, host, port)
    if address.startswith("ray://"):
        return  # Ray Client has its own handshake
    _check_token(address, host)


def _check_reachable(address: str, host: str, port: int) -> None:
    hint = START_HINT.format(host=host, port=port)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except socket.gaierror:
        raise UserError("runtime.address", f"cannot resolve the host of {address!r}; fix --address") from None
    except TimeoutError:
        raise UserError("runtime.address", f"nothing answered at {address} within {CONNECT_TIMEOUT_S:g} s; "
                                           f"{hint}") from None
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UserError("runtime.address", f"no Ray head at {address} ({reason.lower()}); {hint}") from None


def _check_token(address: str, host: str) -> None:
    try:
        from ray._private.authentication.authentication_token_setup import AUTH_MODE_ENV_VAR, _enable_token_auth
        from ray._raylet import AuthenticationTokenLoader
    except ImportError:  # a Ray without token authentication
        return
    outcome = _ask_gcs(address)
    if outcome == "ok":
        return
    if outcome == "silent":
        raise UserError("runtime.address", f"{address} accepts connections but no Ray head answers there; give "
                                           "the head's GCS port (`ray start --head --port=...`, 6379 by default)")
    mode = os.environ.get(AUTH_MODE_ENV_VAR)
    has_token = AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)
    if mode == "token":
        what = "rejects this machine's token" if has_token else "needs a token and none was found here"
        raise UserError("runtime.address", f"the Ray head at {address} {what}; {TOKEN_HINT}")
    if mode is not None:
        raise UserError("runtime.address", f"the Ray head at {address} uses token authentication but "
                                           f"RAY_AUTH_MODE={mode} here; {TOKEN_HINT}")
    if not has_token:
        raise UserError("runtime.address", f"the Ray head at {address} uses token authentication and no token was "
                                           f"found here; {TOKEN_HINT}")
    if not _is_this_machine(host):
        raise UserError("runtime.address", f"the Ray head at {address} uses token authentication; if this machine's "
                                           f"token is the head's, run with RAY_AUTH_MODE=token, else {TOKEN_HINT}")
    if _ask_gcs(address, {AUTH_MODE_ENV_VAR: "token"}) != "ok":
        raise UserError("runtime.address", f"the Ray head at {address} rejects this machine's token; {TOKEN_HINT}")
    _enable_token_auth()  # RAY_AUTH_MODE=token in this process (and Ray's cached config), as Ray does for "auto"
    print(f"raygossip: the Ray head at {address} uses token authentication; connecting with this machine's token "
          "(RAY_AUTH_MODE=token)", file=sys.stderr)


_ASK = """
import sys
from ray._raylet import InnerGcsClient
print("ready", flush=True)
try:
    InnerGcsClient.standalone(sys.argv[1], None, int(sys.argv[2]))
    print("ok", flush=True)
except Exception as error:
    print("denied" if "auth" in type(error).__name__.lower() or "InvalidAuthToken" in str(error) else "silent",
          flush=True)
"""


def _ask_gcs(address: str, env: dict[str, str] | None = None) -> str:
    """"ok" when the GCS at `address` answers, "denied" when it refuses the token (or its lack), "silent" when it
    does not answer within ANSWER_TIMEOUT_S of the question (the child's own start, importing Ray, aside). Asked
    from a child process: Ray's C++ client retries for up to a minute and logs every retry on stderr, and a child
    is one that can be stopped at the deadline."""
    child = subprocess.Popen([sys.executable, "-c", _ASK, address, str(int(ANSWER_TIMEOUT_S * 1000))],
                             env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
    try:
        if _line(child, IMPORT_TIMEOUT_S) != "ready":
            return "silent"
        answer = _line(child, ANSWER_TIMEOUT_S)
        return answer if answer in ("ok", "denied") else "silent"
    finally:
        child.kill()
        child.wait()


def _line(child: subprocess.Popen, timeout_s: float) -> str | None:
    """The child's next line of output, or None when none comes within timeout_s."""
    ready, _, _ = select.select([child.stdout], [], [], timeout_s)
    return child.stdout.readline().strip() if ready else None


def _is_this_machine(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(socket.gethostbyname(host))
    except (OSError, ValueError):
        return False
    if ip.is_loopback:
        return True
    with contextlib.suppress(Exception):
        return str(ip) == ray.util.get_node_ip_address()
    return False


def preflight_cluster(config: Config) -> None:
    """check_address for a Ray-engine run on a cluster that this process has not joined yet (else nothing)."""
    runtime = config.runtime
    if runtime.engine == "ray" and runtime.address is not None and not ray.is_initialized():
        check_address(runtime.address)
