"""A dataset's parts on disk: the sidecar of each part (settings, files, skipped documents),
whether a part is complete, and the merge of N parts into one Megatron indexed dataset that is
byte-identical to an unsharded run. Below the tokenizing run (preprocess.py), which writes the
parts; no tokenizer or process pool here."""
from __future__ import annotations

import glob
import json
import os
import re
import socket
import struct
import time
from pathlib import Path

import numpy as np

from . import idx_format
from .errors import unwritable
from .readers import PreprocessError

MAX_LISTED = 100  # skipped documents kept by file:line in a sidecar or report (all are counted)
SIDECAR_FORMAT = 1


def output_prefix_problem(output_prefix: str) -> str | None:
    """Why ``output_prefix``.bin/.idx cannot be written, or None (checked before any work)."""
    if not output_prefix or output_prefix.endswith(("/", os.sep)):
        return f"--output-prefix {output_prefix!r} names a directory; give a file prefix such as data/mix"
    for ext in (".bin", ".idx"):
        if os.path.isdir(output_prefix + ext):
            return f"{output_prefix}{ext} is a directory; choose another --output-prefix"
    reason = unwritable(Path(output_prefix).parent)
    return f"--output-prefix {output_prefix}: {reason}; choose a writable location" if reason else None


def _temp_name(prefix: str) -> str:
    return f"{prefix}.tmp-{socket.gethostname()}-{os.getpid()}"


def part_prefix(prefix: str, shard: int, shards: int) -> str:
    return f"{prefix}.part-{shard}-of-{shards}"


def read_idx_header(path: str) -> tuple[int, int, int]:
    """(dtype code, sequence count, document count) of a Megatron .idx whose size matches its
    header exactly; PreprocessError otherwise (a truncated or foreign file)."""
    try:
        with open(path, "rb") as f:
            header = idx_format.parse(f.read(idx_format.HEADER_BYTES))
        size = os.path.getsize(path)
    except OSError as e:
        raise PreprocessError(f"{path}: cannot be read ({e.strerror})") from None
    if header is None or header.version != idx_format.VERSION:
        raise PreprocessError(f"{path}: not a Megatron-Core index (bad header)")
    if size != header.index_bytes():
        raise PreprocessError(f"{path}: {size} bytes, but its header says {header.index_bytes()}: truncated")
    return header.code, header.sequences, header.boundaries


def dataset_tokens(prefix: str) -> int:
    """Tokens in an indexed dataset (the sum of its sequence lengths), read from its .idx alone."""
    _, n_seq, _ = read_idx_header(prefix + ".idx")
    lengths = np.memmap(prefix + ".idx", dtype=np.int32, mode="r", offset=idx_format.HEADER_BYTES, shape=(n_seq,)) if n_seq else []
    return int(np.sum(lengths, dtype=np.int64))


def part_problem(prefix: str, settings: dict | None) -> str | None:
    """Why ``prefix`` (one part) is not complete, or not made with ``settings``; None when it is."""
    sidecar = Path(prefix + ".json")
    if not sidecar.is_file():
        present = [e for e in (".bin", ".idx") if Path(prefix + e).exists()]
        return f"incomplete ({' and '.join(present)} without its .json sidecar)" if present else "missing"
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        files = meta["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"incomplete ({sidecar} is not a readable sidecar)"
    for ext in (".bin", ".idx"):
        path = Path(prefix + ext)
        if not path.is_file():
            return f"incomplete ({path} is missing)"
        if path.stat().st_size != files.get(ext):
            return f"incomplete ({path} has {path.stat().st_size} bytes, its sidecar says {files.get(ext)})"
    try:
        read_idx_header(prefix + ".idx")
    except PreprocessError as e:
        return f"incomplete ({e})"
    if settings is not None and meta.get("settings") != settings:
        theirs = meta.get("settings") or {}
        keys = [k for k in sorted(set(settings) | set(theirs)) if settings.get(k) != theirs.get(k)]
        return "made with a different " + ", ".join(keys) + " (" + "; ".join(
            f"{k}: {json.dumps(theirs.get(k))[:80]} here, {json.dumps(settings.get(k))[:80]} expected" for k in keys) + ")"
    return None


def _write_json(path: str, obj: dict) -> None:
    tmp = _temp_name(path[:-len(".json")]) + ".json"
    Path(tmp).write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------- merge

def _parts_on_disk(prefix: str) -> dict[int, set[int]]:
    """{N: {I, ...}} of the files named prefix.part-I-of-N.* present."""
    found: dict[int, set[int]] = {}
    pattern = re.compile(re.escape(Path(prefix).name) + r"\.part-(\d+)-of-(\d+)\.(json|bin|idx)$")
    for path in glob.glob(glob.escape(prefix) + ".part-*-of-*.*"):
        m = pattern.match(Path(path).name)
        if m:
            found.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    return found


def existing_dataset(prefix: str) -> str | None:
    """What ``prefix``.bin/.idx already hold (a line), or None when neither exists."""
    present = [ext for ext in (".bin", ".idx") if os.path.exists(prefix + ext)]
    if not present:
        return None
    try:
        _, _, n_doc = read_idx_header(prefix + ".idx")
        what = f"a dataset of {n_doc - 1:,} documents"
    except (PreprocessError, OSError, ValueError):
        what = "a dataset"
    return f"{prefix}{'/'.join(present)} already hold{'s' if len(present) == 1 else ''} {what}"


def _same_merge(prefix: str, metas: list[dict]) -> bool:
    """Whether ``prefix``.bin/.idx are this merge's output already (its report.json names these parts
    and the files' sizes): merging again rewrites the same bytes (a resubmitted SLURM merge job)."""
    try:
        report = json.loads(Path(prefix + ".report.json").read_text(encoding="utf-8"))
        parts = [(p["shard"], p["documents"], p["tokens"]) for p in report["per_part"]]
        files = {ext: os.path.getsize(prefix + ext) for ext in (".bin", ".idx")}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return (parts == [(m["shard"], m["documents"], m["tokens"]) for m in metas] and report.get("files") == files
            and report.get("tokenizer") == metas[0]["settings"]["tokenizer"])


def merge(output_prefix: str, delete_parts: bool = False, overwrite: bool = False) -> dict:
    """Concatenate ``prefix.part-0..N-1-of-N`` into ``prefix.bin/.idx`` (streamed: memory does not
    grow with the data) and write ``prefix.report.json``; returns the report. Refuses, naming the
    part and the fix, when a part is missing, incomplete or made with other settings, and (unless
    ``overwrite``) when ``prefix.bin/.idx`` hold another dataset than these parts merged."""
    output_prefix = str(output_prefix)
    problem = output_prefix_problem(output_prefix)
    if problem:
        raise PreprocessError(problem)
    found = _parts_on_disk(output_prefix)
    if not found:
        raise PreprocessError(f"no parts {output_prefix}.part-I-of-N.* to merge: run tools/preprocess_data.py "
                              "with --shard I/N (I = 0..N-1) first")
    if len(found) > 1:
        raise PreprocessError(f"parts of several splits under {output_prefix}: N = "
                              f"{', '.join(map(str, sorted(found)))}; remove the parts of the split you do not want")
    shards = next(iter(found))
    metas, settings = [], None
    for i in range(shards):
        prefix = part_prefix(output_prefix, i, shards)
        why = part_problem(prefix, settings)
        if why:
            raise PreprocessError(f"part {i} of {shards} ({prefix}) is {why}: rerun it with --shard {i}/{shards} "
                                  f"(array task {i}) and the same settings, then merge again")
        metas.append(json.loads(Path(prefix + ".json").read_text(encoding="utf-8")))
        settings = settings or metas[0]["settings"]
    held = existing_dataset(output_prefix)
    if held and not overwrite and not _same_merge(output_prefix, metas):
        raise PreprocessError(f"--output-prefix {output_prefix}: {held}, not these {shards} parts merged (its "
                              f"{output_prefix}.report.json does not list them); pass --overwrite to replace it, "
                              "or merge under another prefix")
    headers = [read_idx_header(part_prefix(output_prefix, i, shards) + ".idx") for i in range(shards)]
    codes = {h[0] for h in headers}
    if len(codes) != 1:
        raise PreprocessError(f"the parts of {output_prefix} have different token dtypes ({sorted(codes)}): "
                              "they were not made with one tokenizer; redo them")
    documents = sum(m["documents"] for m in metas)
    if documents == 0:
        raise PreprocessError(f"no valid document in any part of {output_prefix} "
                              f"({sum(m['skipped_count'] for m in metas)} skipped)")
    start = time.perf_counter()
    _concat(output_prefix, shards, codes.pop(), headers)
    report = _report(output_prefix, metas, time.perf_counter() - start)
    _write_json(output_prefix + ".report.json", report)
    if delete_parts:
        for i in range(shards):
            for ext in (".bin", ".idx", ".json"):
                Path(part_prefix(output_prefix, i, shards) + ext).unlink(missing_ok=True)
    return report


def _concat(prefix: str, shards: int, code: int, headers: list[tuple[int, int, int]]) -> None:
    """Write what one IndexedDatasetBuilder fed every part's documents in order would write."""
    tmp = _temp_name(prefix)
    n_seq = sum(h[1] for h in headers)
    n_doc = sum(h[2] - 1 for h in headers) + 1
    block = 1 << 22
    try:
        with open(tmp + ".bin", "wb") as out:
            for i in range(shards):
                with open(part_prefix(prefix, i, shards) + ".bin", "rb") as f:
                    while chunk := f.read(1 << 24):
                        out.write(chunk)
        with open(tmp + ".idx", "wb") as out:
            out.write(idx_format.pack(code, n_seq, n_doc))
            idxs = [part_prefix(prefix, i, shards) + ".idx" for i in range(shards)]
            for path, (_, s, _) in zip(idxs, headers):       # sequence lengths
                lengths = np.memmap(path, np.int32, "r", idx_format.HEADER_BYTES, (s,)) if s else np.empty(0, np.int32)
                for a in range(0, s, block):
                    out.write(np.ascontiguousarray(lengths[a:a + block]).tobytes())
            byte_offset = 0
            for path, (_, s, _) in zip(idxs, headers):       # sequence pointers, shifted
                if s:
                    ptrs = np.memmap(path, np.int64, "r", idx_format.HEADER_BYTES + 4 * s, (s,))
                    for a in range(0, s, block):
                        out.write((ptrs[a:a + block] + byte_offset).astype(np.int64).tobytes())
                byte_offset += os.path.getsize(path[:-len(".idx")] + ".bin")
            out.write(struct.pack("<q", 0))
            seq_offset = 0
            for path, (_, s, d) in zip(idxs, headers):       # document indices, shifted, leading 0 once
                if d > 1:
                    docs = np.memmap(path, np.int64, "r", idx_format.HEADER_BYTES + 12 * s + 8, (d - 1,))
                    for a in range(0, d - 1, block):
                        out.write((docs[a:a + block] + seq_offset).astype(np.int64).tobytes())
                seq_offset += s
        Path(prefix + ".idx").unlink(missing_ok=True)
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")
    except BaseException:
        for ext in (".bin", ".idx"):
            Path(tmp + ext).unlink(missing_ok=True)
        raise


def _report(prefix: str, metas: list[dict], merge_seconds: float) -> dict:
    skipped = [s for m in metas for s in m["skipped"]][:MAX_LISTED]
    return {"output_prefix": prefix, "parts": len(metas), "documents": sum(m["documents"] for m in metas),
            "tokens": sum(m["tokens"] for m in metas), "bytes_in": sum(m["bytes_in"] for m in metas),
            "skipped_count": sum(m["skipped_count"] for m in metas), "skipped": skipped,
            "tokenizer": metas[0]["settings"]["tokenizer"], "merge_seconds": round(merge_seconds, 3),
            "per_part": [{k: m[k] for k in ("shard", "documents", "tokens", "bytes_in", "skipped_count", "seconds",
                                             "cpu_seconds", "encoder", "host", "finished")} for m in metas],
            "files": {ext: os.path.getsize(prefix + ext) for ext in (".bin", ".idx")}}


def report_text(report: dict, max_listed: int = 20) -> str:
    """The merge report for people: totals, slowest parts, skipped documents."""
    parts = report["per_part"]
    cpu = sum(p["cpu_seconds"] for p in parts)
    slow = max(parts, key=lambda p: p["seconds"])
    lines = [f"merged {report['parts']} parts: documents: {report['documents']:,}  tokens: {report['tokens']:,}  "
             f"bytes in: {report['bytes_in']:,}  skipped: {report['skipped_count']:,}",
             f"parts: {sum(p['seconds'] for p in parts):,.1f} s in all ({cpu:,.1f} CPU-s, "
             f"{report['tokens'] / max(cpu, 1e-9):,.0f} tokens per CPU-s); slowest: part {slow['shard']} "
             f"{slow['seconds']:,.1f} s on {slow['host']}; merge {report['merge_seconds']:.1f} s"]
    lines += [f"  skipped {path}:{line}: {reason}" for path, line, reason in report["skipped"][:max_listed]]
    if report["skipped_count"] > max_listed:
        lines.append(f"  ... and {report['skipped_count'] - max_listed:,} more skipped documents")
    return "\n".join(lines)
