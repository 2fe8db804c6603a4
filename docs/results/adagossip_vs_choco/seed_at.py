"""One more seed at a grid point that was not picked (a robustness check of a pick): the config of the point's
seed-0 tuning trial with another seed, into PART/check-RULE+GAMMA-sSEED. Usage: seed_at.py PART RULE GAMMA SEED."""
import sys, time
from pathlib import Path
from raygossip.api import run
from raygossip.config import Config
from raygossip.config_io import to_dict, from_dict
from raygossip.validation import load_config

part, rule, gamma, seed = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
source = next(part.glob(f"p[0-9][0-9]-gossip.rule={rule},gossip.gamma={gamma}-s0"))
folder = part / f"check-{rule}{gamma}-s{seed}"
if not (folder / "summary.json").is_file():
    config = from_dict(Config, {**to_dict(load_config(source / "config.yaml")), "seed": seed})
    t = time.time()
    run(config, out_dir=folder, progress=False)
    print(f"{time.strftime('%H:%M:%S')} {folder.name} {time.time() - t:.0f}s", flush=True)
