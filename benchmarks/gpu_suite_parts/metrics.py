"""Figures from a finished run: the trainer's metrics.jsonl, MFU, a failed process's error line."""
from __future__ import annotations

import json
from pathlib import Path

from .common import PEAK


def read_rows(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def throughput(rows: list[dict], warmup: int, tokens_per_step: int) -> dict:
    """Tokens/s over the steps after ``warmup`` (total tokens / total time of those steps)."""
    steps = [r for r in rows if "tokens_per_s" in r and not r.get("skipped")]
    timed = [r for r in steps if r["step"] > warmup] or steps[-1:]
    if not timed:
        return {}
    seconds = sum(tokens_per_step / r["tokens_per_s"] for r in timed)
    tps = tokens_per_step * len(timed) / seconds
    return {"tokens_per_s": tps, "step_s": seconds / len(timed), "timed_steps": len(timed),
            # the allocator's peak on GPU; the dry run on CPU logs the process's peak RSS instead
            "peak_mem_gib": max(r.get("peak_mem_gib", r.get("peak_rss_gib", 0.0)) for r in steps),
            "planned_mem_gib": steps[-1].get("planned_mem_gib"), "losses": [r["loss"] for r in steps]}


def mfu(tokens_per_s: float, fpt: float) -> float:
    return tokens_per_s * fpt / (PEAK * 1e12)


def attention_line(text: str) -> str | None:
    return next((line[len("attention: "):].strip() for line in text.splitlines() if line.startswith("attention: ")), None)


def error_of(res: dict) -> str:
    if res["timed_out"]:
        return f"timed out after {res['seconds']} s (see {res['log']})"
    lines = [ln for ln in res["text"].splitlines() if ln.strip()]
    err = [ln for ln in lines if "Error" in ln or ln.startswith("error:")]
    return f"exit {res['rc']}: {(err or lines or ['no output'])[-1][:400]} (see {res['log']})"


def rel_diffs(a: list[float], b: list[float]) -> list[float]:
    return [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)]
