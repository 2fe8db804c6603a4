"""Seeds 3 and 4 at each rule's pick (after run_trials.py): the same config as pick-RULE-s2, another seed."""
import sys, time
from pathlib import Path
from raygossip.api import run
from raygossip.config import Config
from raygossip.config_io import to_dict, from_dict
from raygossip.validation import load_config

part = Path(sys.argv[1])
for seed in (3, 4):
    for rule in ("choco", "adagossip"):
        folder = part / f"pick-{rule}-s{seed}"
        if (folder / "summary.json").is_file():
            continue
        config = from_dict(Config, {**to_dict(load_config(part / f"pick-{rule}-s2" / "config.yaml")), "seed": seed})
        t = time.time()
        run(config, out_dir=folder, progress=False)
        print(f"{time.strftime('%H:%M:%S')} {folder.name} {time.time() - t:.0f}s", flush=True)
