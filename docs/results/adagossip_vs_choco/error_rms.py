"""Where AdaGossip's step lives for a compressor: quantiles over elements (all agents) of the denominator
sqrt(u / (1 - beta^t)) of its per-element step min(1, gamma / denominator), i.e. the running RMS of each
element's gossip error, at a few rounds of a short run. Usage: error_rms.py COMPRESSOR_YAML EPOCHS GAMMA PART."""
import sys
import torch
from raygossip.algorithms import consensus
from raygossip.api import run
from raygossip.config import Config
from raygossip.config_io import apply_overrides, read_yaml, from_dict

compressor, epochs, gamma, part = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
SHOW = {1, 10, 50, 106, 212, 318, 424, 530, 636, 848, 1060}
seen: dict[int, list[torch.Tensor]] = {}
original = consensus.rms_scaled_step


def logged(beta=0.999, eps=1e-8, cap=1.0):
    inner = original(beta=beta, eps=eps, cap=cap)

    def scale(r, state, g):
        step, state = inner.scale(r, state, g)
        if state.rounds in SHOW:
            seen.setdefault(state.rounds, []).append((state.u / (1.0 - beta**state.rounds)).sqrt())
        return step, state

    return consensus.StepSize(init=inner.init, scale=scale)


consensus.rms_scaled_step = logged
config = from_dict(Config, apply_overrides(read_yaml("configs/cpu/adagossip_mnist_mlp.yaml"), [
    f"gossip.compressor={compressor}", f"data.partition={part}", f"train.epochs={epochs}", f"gossip.gamma={gamma}",
    "runtime.torch_threads=1", "runtime.progress=false", "gossip.rule=adagossip"]))
result = run(config, progress=False)
print(f"{compressor}, {part}, adagossip gamma {gamma}, {epochs} epochs: quantiles over elements of the error RMS")
print("round | zero | q10 | q25 | q50 | q75 | q90 | rms of all")
for rounds in sorted(seen):
    d = torch.cat(seen[rounds])
    nz = d[d > 0]
    q = torch.quantile(nz[torch.randperm(nz.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]],
                       torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9]))
    print(f"{rounds} | {(d == 0).float().mean():.3f} | " + " | ".join(f"{v:.2e}" for v in q.tolist())
          + f" | {d.pow(2).mean().sqrt():.2e}")
