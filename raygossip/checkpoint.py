"""Whole-run checkpoints: every agent's state in one safetensors file plus a JSON manifest, written atomically."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from raygossip.config import Config
from raygossip.config_io import to_dict
from raygossip.errors import UserError
from raygossip.results import save_tensors_atomic, write_json_atomic

MANIFEST = "checkpoint.json"
FORMAT = 1
# Keys that may differ between the run that wrote a checkpoint and the one resuming it.
RESUMABLE_DIFFERENCES = ("runtime", "eval")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def training_identity(config: Config) -> dict:
    """The parts of a config that must match for a checkpoint to be resumed."""
    data = to_dict(config)
    for key in RESUMABLE_DIFFERENCES:
        data.pop(key)
    return data


def save_checkpoint(run_dir: str | Path, config: Config, run_state: dict, agents: list[tuple[dict, dict]]) -> Path:
    """Write agents' tensors to a new file, then the manifest (atomically), then drop the previous file.

    A crash at any moment leaves a manifest that points at a complete tensors file.
    """
    run_dir = Path(run_dir)
    step = int(run_state["step"])
    tensors: dict[str, torch.Tensor] = {}
    metas = []
    for index, (agent_tensors, meta) in enumerate(agents):
        tensors.update({f"agent{index}/{name}": t for name, t in agent_tensors.items()})
        metas.append(meta)
    name = f"checkpoint-step{step:09d}.safetensors"
    save_tensors_atomic(run_dir / name, tensors)
    previous = _previous_tensors_file(run_dir)
    manifest = {
        "format": FORMAT, "tensors": name, "sha256": _sha256(run_dir / name), "step": step,
        "agents": len(agents), "config": training_identity(config), "run_state": run_state, "agent_meta": metas,
    }
    write_json_atomic(run_dir / MANIFEST, manifest)
    if previous is not None and previous != name and (run_dir / previous).exists():
        (run_dir / previous).unlink()
    return run_dir / MANIFEST


def _previous_tensors_file(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / MANIFEST).read_text()).get("tensors")
    except (OSError, ValueError, AttributeError):
        return None


def load_checkpoint(run_dir: str | Path, config: Config) -> tuple[dict, list[tuple[dict, dict]]]:
    """The run state and each agent's (tensors, meta); every problem is a one-line UserError('checkpoint', ...)."""
    run_dir = Path(run_dir)
    path = run_dir / MANIFEST
    if not path.is_file():
        raise UserError("checkpoint", f"no {MANIFEST} in {str(run_dir)!r} (was the run started with --checkpoint-every?)")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError("checkpoint", f"{path} is not valid JSON ({error.__class__.__name__}); the file is corrupt") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError("checkpoint", f"{path} is not a raygossip checkpoint manifest (format {FORMAT})")
    missing = [k for k in ("tensors", "sha256", "agents", "config", "run_state", "agent_meta") if k not in manifest]
    if missing:
        raise UserError("checkpoint", f"{path} lacks {', '.join(missing)}; the file is corrupt")
    if manifest["config"] != training_identity(config):
        changed = _differing_keys(manifest["config"], training_identity(config))
        raise UserError("checkpoint", f"was written by a different config (differs in {', '.join(changed[:5])})")
    if manifest["agents"] != config.agents.count:
        raise UserError("checkpoint", f"holds {manifest['agents']} agents, the config has {config.agents.count}")
    tensors_path = run_dir / manifest["tensors"]
    if not tensors_path.is_file():
        raise UserError("checkpoint", f"tensors file {tensors_path.name} is missing")
    if _sha256(tensors_path) != manifest["sha256"]:
        raise UserError("checkpoint", f"{tensors_path.name} does not match its checksum (truncated or corrupt)")
    try:
        flat = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError("checkpoint", f"{tensors_path.name} cannot be read: {str(error).splitlines()[0]}") from None
    agents = []
    for index, meta in enumerate(manifest["agent_meta"]):
        prefix = f"agent{index}/"
        agents.append(({k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}, meta))
    return manifest["run_state"], agents


def _differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [k for key in keys for k in _differing_keys(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]
