"""metrics.jsonl and summary.json are strict JSON: a non-finite number is written as null, never NaN."""

import json
import math

import numpy as np
import pytest
import torch

from raygossip.results import MetricsLog, read_metrics, strict_json, write_json_atomic


def _strict_load(text: str):
    def refuse(token: str):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize(
    "value, expected",
    [
        (float("nan"), None),
        (float("inf"), None),
        (-math.inf, None),
        (np.float32("nan"), None),
        (np.float64(0.5), 0.5),
        (torch.tensor(float("nan")), None),
        (torch.tensor(2.0), 2.0),
        ([1.0, float("nan"), {"a": (float("-inf"), 3)}], [1.0, None, {"a": [None, 3]}]),
        ({"loss": float("nan"), "ok": True, "n": 3, "s": "x"}, {"loss": None, "ok": True, "n": 3, "s": "x"}),
    ],
)
def test_non_finite_numbers_become_null(value, expected):
    text = strict_json({"v": value})
    assert "NaN" not in text and "Infinity" not in text
    assert _strict_load(text) == {"v": expected}


def test_metrics_log_and_summary_are_strict_json(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.append({"step": 1, "train_loss": float("nan"), "local_test_accuracy": [0.5, float("inf")]})
    log.append({"step": 2, "train_loss": 0.25})
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        _strict_load(line)
    assert read_metrics(tmp_path / "metrics.jsonl")[0] == {"step": 1, "train_loss": None, "local_test_accuracy": [0.5, None]}
    write_json_atomic(tmp_path / "summary.json", {"merged_test_accuracy": float("nan"), "events": []})
    assert _strict_load((tmp_path / "summary.json").read_text()) == {"merged_test_accuracy": None, "events": []}
