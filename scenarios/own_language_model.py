"""Your own model and data, (a): a character-level GRU language model, gossip-trained on the project's own text.

The text is the project's own: docs/*.md and every raygossip/**/*.py file, nothing downloaded. Each file is
cut into windows of `seq_len + 1` characters (the first 90 % of a file trains, the last 10 % tests), and the
windows of the files, taken in path order, form 16 contiguous sections of equal size: agent k trains on
section k only (`data.partition.kind: by_key` with `data.partition.key: scenarios.own_language_model:section_of`;
a key sees a sample, not its index, so the loader notes which section each window's text came from), so one
agent reads docs/CONFIG.md, another the engines, another the models: non-IID by files. The model (`char_gru`:
embedding, one GRU layer, a linear head) and the loader (`load_text`) are ordinary user code referenced by
import path, as a user's own package would be:

    model.name: scenarios.own_language_model:char_gru      train.loss: next_token
    data.name:  scenarios.own_language_model:load_text     eval.metric: perplexity

It runs 16 agents on a ring with D-PSGD (gamma 1) and the exact merge at the end, against parallel SGD (the exact
average every step, complete graph, as in scenarios/late_communication.py) for the same number of steps, and
prints the test perplexity of both (lower is better; a model guessing uniformly has perplexity = vocabulary
size, 98) and whether the merged model is within 10 % of parallel SGD.

    python -m scenarios own_language_model                 # the cpu scale: 16 agents, a few minutes
    python -m scenarios own_language_model --scale smoke   # seconds (tests)
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.utils.data import Dataset as TorchDataset


from scenarios import common
from scenarios.common import Outcome, Variant

SCENARIO = "own_language_model"
HERE = "scenarios.own_language_model"
REPO = Path(__file__).resolve().parents[1]
CHARS = "\n\t" + "".join(chr(c) for c in range(32, 127))  # printable ASCII; anything else is UNKNOWN
UNKNOWN = len(CHARS)
VOCAB = len(CHARS) + 1  # 98
TEST_SHARE = 0.1
SECTIONS = 16
WITHIN = 0.10  # the bar: merged perplexity within 10 % of parallel SGD's


# ---------------------------------------------------------------- the user's data


def corpus_files(root: Path = REPO) -> list[Path]:
    """The text the example trains on, in path order: the project's docs and its package's source."""
    return sorted(root.glob("docs/*.md")) + sorted(root.glob("raygossip/**/*.py"))


def encode(text: str) -> torch.Tensor:
    """Characters -> int64 token ids (CHARS' positions; UNKNOWN for anything else)."""
    table = {c: i for i, c in enumerate(CHARS)}
    return torch.tensor([table.get(c, UNKNOWN) for c in text], dtype=torch.int64)


class Windows(TorchDataset):
    """Map-style text windows: sample i is (tokens[s : s+T], tokens[s+1 : s+T+1]), the next character at each place."""

    def __init__(self, tokens: torch.Tensor, starts: torch.Tensor, seq_len: int):
        self.tokens, self.starts, self.seq_len = tokens, starts, seq_len

    def __len__(self) -> int:
        return int(self.starts.numel())

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = int(self.starts[index])
        return self.tokens[s: s + self.seq_len], self.tokens[s + 1: s + self.seq_len + 1]


def _windows(pieces: list[torch.Tensor], seq_len: int, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """All pieces end to end and the start of every whole window of seq_len + 1 inside one piece, in order."""
    tokens = torch.cat(pieces)
    starts, offset = [], 0
    for piece in pieces:
        starts += range(offset, offset + piece.numel() - seq_len - 1, seq_len)
        offset += piece.numel()
    if limit is not None and len(starts) > limit:  # an even subsample, every part of the corpus kept
        keep = torch.linspace(0, len(starts) - 1, limit).round().long().tolist()
        starts = [starts[i] for i in keep]
    return tokens, torch.tensor(starts, dtype=torch.int64)


# by_key sees a sample, not its index: the loader notes which section each training window's text came from
_SECTION_OF_TEXT: dict[bytes, int] = {}


def load_text(*, seq_len: int = 64, max_train: int | None = None,
              max_test: int | None = None) -> tuple[Windows, Windows]:
    """The loader: (train, test) map-style datasets of character windows from the project's docs and source.

    max_train / max_test: at most this many windows, evenly spread over the corpus (None: all). The training
    windows, in their files' path order, are cut into SECTIONS contiguous runs of equal size (a few neighbouring
    files each); section_of(sample) says which run a window lies in.
    """
    texts = [encode(path.read_text(encoding="utf-8", errors="replace")) for path in corpus_files()]
    cuts = [max(1, int(len(t) * (1 - TEST_SHARE))) for t in texts]
    train = Windows(*_windows([t[:c] for t, c in zip(texts, cuts)], seq_len, max_train), seq_len)
    test = Windows(*_windows([t[c:] for t, c in zip(texts, cuts)], seq_len, max_test), seq_len)
    _SECTION_OF_TEXT.clear()
    for index in range(len(train)):  # a window repeated in two sections (a licence header) keeps the first
        _SECTION_OF_TEXT.setdefault(train[index][0].numpy().tobytes(), index * SECTIONS // len(train))
    return train, test


def section_of(sample: tuple[torch.Tensor, torch.Tensor]) -> int:
    """The by_key partition's key: the section (a run of neighbouring files) a training window comes from."""
    if not _SECTION_OF_TEXT:
        raise RuntimeError("section_of needs load_text to have run in this process")
    return _SECTION_OF_TEXT[sample[0].numpy().tobytes()]


# ---------------------------------------------------------------- the user's model


class CharGRU(nn.Module):
    """Embedding -> one GRU layer -> linear head: (N, T) token ids to (N, T, vocab) next-character logits."""

    def __init__(self, vocab: int, embed: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.gru = nn.GRU(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(tokens))
        return self.head(out)


def char_gru(*, embed: int = 32, hidden: int = 128) -> nn.Module:
    """The model factory: it takes only its params (the vocabulary is the example's own, not read from the data)."""
    return CharGRU(VOCAB, embed, hidden)


# ---------------------------------------------------------------- the scenario

CPU = {
    "data": {"name": f"{HERE}:load_text", "params": {"seq_len": 64},
             "partition": {"kind": "by_key", "key": f"{HERE}:section_of"}},
    "model": {"name": f"{HERE}:char_gru", "params": {"embed": 32, "hidden": 128}},
    "agents": {"count": 16},
    "topology": {"name": "ring", "weights": "uniform"},
    "train": {"epochs": 4, "steps_per_epoch": 50, "batch_size": 16, "lr": 0.5, "momentum": 0.9,
              "optimizer": "sgd", "grad_clip_value": 1.0, "loss": "next_token"},
    "gossip": common.EXACT_GOSSIP,
    "schedule": {"averaging_rate": {"kind": "constant", "gamma0": 1.0}, "communication": {"kind": "every"},
                 "final_merge": {"enabled": True}},
    "eval": {"every": 1, "local": True, "metric": "perplexity", "test_samples": 1000, "batch_size": 250},
    "runtime": {"engine": "reference", "progress": False, "num_cpus_per_agent": 0.125,
                "agents_per_actor": 8, "wait_timeout_s": 300.0},
}
SMOKE = {
    "data": {"params": {"seq_len": 32, "max_train": 2000, "max_test": 200}},
    "model": {"params": {"embed": 16, "hidden": 32}},
    "agents": {"count": 4},
    "train": {"epochs": 2, "steps_per_epoch": 15, "batch_size": 8, "lr": 0.5},
    "eval": {"test_samples": None, "batch_size": 200},
    "runtime": {"agents_per_actor": 2, "num_cpus_per_agent": 0.25, "wait_timeout_s": 60.0},
}
GOSSIP = "D-PSGD ring + final merge"
PARALLEL = "parallel SGD"


def base_of(scale: str, overrides: Sequence[str] = ()) -> dict:
    """The example's own config (no YAML file): cpu, or smoke shrunk to seconds."""
    return common.scaled_base(CPU, SMOKE, scale, overrides)


def variants(scale: str = "cpu", overrides: Sequence[str] = ()) -> list[Variant]:
    base = base_of(scale, overrides)
    return [common.variant(SCENARIO, base, GOSSIP), common.parallel_sgd(SCENARIO, base)]


def perplexities(outcomes: Sequence[Outcome]) -> dict[str, list[float]]:
    """Merged test perplexity per variant label (one value per seed)."""
    return {label: [run.summary["merged_test_perplexity"] for run in runs]
            for label, runs in common.by_label(outcomes).items()}


def verdict(outcomes: Sequence[Outcome]) -> tuple[float, float, bool]:
    """(merged perplexity, parallel SGD perplexity, within 10 %), means over the seeds."""
    ppl = perplexities(outcomes)
    merged, parallel = common.mean_std(ppl[GOSSIP])[0], common.mean_std(ppl[PARALLEL])[0]
    return merged, parallel, merged <= parallel * (1 + WITHIN)


def report(outcomes: Sequence[Outcome]) -> str:
    rows = []
    for label, runs in common.by_label(outcomes).items():
        s = [run.summary for run in runs]
        rows.append([label, ",".join(str(run.seed) for run in runs),
                     common.pm([x.get("merged_test_perplexity") for x in s], 2),
                     common.pm([x.get("mean_local_test_perplexity") for x in s], 2),
                     str(runs[0].config.train.epochs * (runs[0].config.train.steps_per_epoch or 0)),
                     f"{sum(x.get('bytes_sent') or 0 for x in s) / len(s) / 1e6:.1f}"])
    merged, parallel, ok = verdict(outcomes)
    table = common.markdown(["label", "seeds", "merged test perplexity", "mean local perplexity", "steps",
                             "MB sent"], rows)
    return (f"Character-level GRU, {runs[0].config.agents.count} agents, each on its own files of the project "
            f"(vocabulary {VOCAB}: a uniform guess has perplexity {VOCAB}).\n\n" + table
            + f"\nMerged model {merged:.2f} against parallel SGD {parallel:.2f} at equal steps: "
              f"{merged / parallel - 1:+.1%}, {'within' if ok else 'NOT within'} {WITHIN:.0%}.\n")


COMMAND = common.Scenario(SCENARIO, __doc__, variants, report)
