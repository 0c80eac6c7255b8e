"""The prepared SFT directory's files and the plan of training rows: which conversations share a
row, and in which order rows are read each epoch.

Numpy only, and nothing of the project's above it: the schema (config.py) derives ``train.steps``
from ``data.epochs`` with :func:`steps_for_epochs` without importing the data pipeline (sft.py,
which re-exports everything here).

Packing is best-fit decreasing (:func:`pack_rows`): conversations longest first, each into the
open row with the least room that still fits it. On a realistic length mix it fills ~98% of the
positions where next-fit in a shuffled order (:func:`pack_next_fit`, the old packer) fills ~82%.
Rows are packed once per (data, seq_len, seed) and shuffled per epoch (:func:`epoch_plan`): with
block-diagonal attention a conversation's loss does not depend on its row mates, so only the
order of rows (which batch a conversation lands in) needs to change between epochs.
"""
from __future__ import annotations

import json
import math
from bisect import bisect_left, insort
from pathlib import Path

import numpy as np

from .errors import DataError

FORMAT_VERSION = 1


class SFTDataError(DataError, RuntimeError):
    """A prepared SFT directory that cannot be used as configured. The message (one line) names the
    file and says the fix. A DataError (what the training entry point reports as ``error: ...``,
    exit 2); still a RuntimeError for callers that caught it as one."""


def _prepare_hint(path, meta: dict | None = None) -> str:
    """The command that (re)creates ``path``, with what meta.json recorded when it is readable."""
    meta = meta if isinstance(meta, dict) else {}
    inputs = " ".join(map(str, meta.get("inputs") or [])) or "INPUT.jsonl"
    return (f"`python tools/prepare_sft.py {inputs} --tokenizer {meta.get('tokenizer') or 'TOK'} --out {path} "
            f"--seq-len {meta.get('seq_len') or 'SEQ_LEN'}`")


def check_prepared(path: str | Path, key: str | None = None) -> tuple[dict, np.ndarray]:
    """(meta, offsets) of a prepared directory whose files are all there and agree in size (a few
    small reads; offsets.npy memory-mapped). Raises SFTDataError naming the file and the fix;
    ``key``, when given, is the recipe key that names ``path``."""
    path = Path(path)
    named = f"; {key} names it" if key else ""
    if not path.is_dir():
        raise SFTDataError(f"{path}: no such directory (no prepared SFT data{named}): fix the path, or create it "
                           f"with {_prepare_hint(path)}")
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise SFTDataError(f"{path}: no prepared SFT data (meta.json missing{named}); create it with "
                           f"{_prepare_hint(path)}")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SFTDataError(f"{meta_file}: unreadable ({' '.join(str(err).split())}): a truncated copy? re-run "
                           f"{_prepare_hint(path)} (or copy the directory again)") from None
    redo = f"re-run {_prepare_hint(path, meta)} (or copy the directory again)"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise SFTDataError(f"{path}: format {got} is not {FORMAT_VERSION}; {redo}")
    for key in ("vocab_size", "pad_id"):
        if not isinstance(meta.get(key), int):
            raise SFTDataError(f"{meta_file}: no integer {key!r}: {redo}")
    for name in ("tokens.bin", "loss_mask.bin", "offsets.npy"):
        if not (path / name).is_file():
            raise SFTDataError(f"{path / name} is missing (meta.json is there): an incomplete copy? {redo}")
    try:
        offsets = np.load(path / "offsets.npy", mmap_mode="r")
    except Exception as err:  # ValueError, EOFError, OSError, UnpicklingError: a truncated or foreign file
        raise SFTDataError(f"{path / 'offsets.npy'}: unreadable ({' '.join(str(err).split())}): {redo}") from None
    if offsets.ndim != 1 or offsets.dtype.kind not in "iu" or len(offsets) < 1 or int(offsets[0]) != 0:
        raise SFTDataError(f"{path / 'offsets.npy'}: not conversation offsets (a 1-D integer array from 0): {redo}")
    if len(offsets) < 2:
        raise SFTDataError(f"{path}: no conversation (offsets.npy is empty): {redo} with non-empty input")
    total = int(offsets[-1])
    kept = meta.get("summary", {}).get("conversations") if isinstance(meta.get("summary"), dict) else None
    if kept is not None and kept != len(offsets) - 1:
        raise SFTDataError(f"{path / 'offsets.npy'}: {len(offsets) - 1} conversations, but meta.json counts {kept}: "
                           f"the files come from different runs; {redo}")
    for name, itemsize in (("tokens.bin", 4), ("loss_mask.bin", 1)):
        size = (path / name).stat().st_size
        if size != total * itemsize:
            what = "truncated (an interrupted copy?)" if size < total * itemsize else "longer than offsets.npy says"
            raise SFTDataError(f"{path / name}: {size:,} bytes, but offsets.npy says {total * itemsize:,} "
                               f"({total:,} tokens): the file is {what}; {redo}")
    return meta, offsets


def _too_long(path, longest: int, seq_len: int, prepared_for) -> SFTDataError:
    return SFTDataError(
        f"{path}: a conversation has {longest} tokens, more than train.seq_len + 1 = {seq_len + 1}: "
        f"it was prepared with --seq-len {prepared_for}; re-run tools/prepare_sft.py with --seq-len {seq_len}")


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The conversation order of one epoch: a permutation drawn from (seed, epoch)."""
    return np.random.default_rng([seed, epoch, 0x5F7]).permutation(n)


def pack_next_fit(positions: np.ndarray, seq_len: int) -> np.ndarray:
    """Next-fit packing in the given order (the packer before best-fit, kept as the baseline
    :func:`pack_rows` is measured against): row boundaries into ``positions`` (each <= seq_len)
    so that every row's total is <= seq_len. Returns start indices, with len(positions) last."""
    csum = np.concatenate([[0], np.cumsum(positions, dtype=np.int64)])
    bounds, j, n = [0], 0, len(positions)
    while j < n:
        j = int(np.searchsorted(csum, csum[j] + seq_len, side="right")) - 1
        bounds.append(j)
    return np.asarray(bounds, dtype=np.int64)


def pack_rows(positions: np.ndarray, seq_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing: (order, bounds) with row r holding conversations
    ``order[bounds[r]:bounds[r+1]]``, each row's ``positions`` summing to <= seq_len.

    Longest first (ties in an order drawn from ``seed``), each conversation goes to the open row
    whose free room is the smallest that fits it, else opens a row. Deterministic; O(n log S)."""
    positions = np.asarray(positions, dtype=np.int64)
    n = len(positions)
    tie = np.random.default_rng([seed, 0xB1F]).permutation(n)
    order = tie[np.argsort(-positions[tie], kind="stable")]
    rows: list[list[int]] = []
    rooms: list[int] = []  # the distinct free rooms of open rows, sorted
    by_room: dict[int, list[int]] = {}  # free room -> open rows with that room
    for c, x in zip(order.tolist(), positions[order].tolist()):
        k = bisect_left(rooms, x)
        if k == len(rooms):
            r, room = len(rows), seq_len - x
            rows.append([c])
        else:
            bucket = by_room[rooms[k]]
            r, room = bucket.pop(), rooms[k] - x
            if not bucket:
                del by_room[rooms[k]]
                rooms.pop(k)
            rows[r].append(c)
        if room > 0:
            if room in by_room:
                by_room[room].append(r)
            else:
                by_room[room] = [r]
                insort(rooms, room)
    sizes = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
    flat = np.fromiter((c for row in rows for c in row), dtype=np.int64, count=n)
    return flat, np.concatenate([[0], np.cumsum(sizes)])


def epoch_plan(order: np.ndarray, bounds: np.ndarray, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of :func:`pack_rows` in the order of one epoch, a permutation drawn from (seed, epoch)."""
    perm = epoch_order(len(bounds) - 1, seed, epoch)
    sizes = np.diff(bounds)[perm]
    new_bounds = np.concatenate([[0], np.cumsum(sizes)])
    index = np.repeat(bounds[:-1][perm] - new_bounds[:-1], sizes) + np.arange(new_bounds[-1])
    return order[index], new_bounds


def fill_ratio(positions: np.ndarray, rows: int, seq_len: int) -> float:
    """Fraction of the input positions of ``rows`` rows that hold conversation tokens."""
    return float(np.sum(positions, dtype=np.int64)) / max(rows * seq_len, 1)


def rows_per_epoch(lengths: np.ndarray, seq_len: int, seed: int, packing: bool) -> int:
    """Training rows of one epoch: one per conversation, or the packed rows (the same every epoch)."""
    return len(pack_rows(lengths - 1, seq_len, seed)[1]) - 1 if packing else len(lengths)


def steps_for_epochs(path: str | Path, seq_len: int, seed: int, packing: bool, epochs: int, global_batch: int) -> int:
    """Optimizer steps that cover ``epochs`` passes over the data: ceil(rows / global batch)."""
    meta, offsets = check_prepared(path)
    lengths = np.diff(np.asarray(offsets))
    longest = int(lengths.max())
    if longest > seq_len + 1:
        raise _too_long(path, longest, seq_len, meta.get("seq_len"))
    return max(1, math.ceil(epochs * rows_per_epoch(lengths, seq_len, seed, packing) / global_batch))
