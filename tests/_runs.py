"""Helpers of the trainer tests that start `python -m minitrain train` runs and read what they wrote."""

import json
from pathlib import Path


def cli_flags(cfg: dict) -> list[str]:
    """TrainConfig fields → `python -m minitrain train` flags (booleans as --x / --no-x)."""
    out = []
    for k, v in cfg.items():
        flag = "--" + k.replace("_", "-")
        out += [flag if v else "--no-" + flag[2:]] if isinstance(v, bool) else [flag, str(v)]
    return out


def read_metrics(out) -> list[dict]:
    """The records of OUT/metrics.jsonl."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
