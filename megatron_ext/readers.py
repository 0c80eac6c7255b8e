"""Raw documents out of JSONL, text and Parquet files, and the split of a set of files into N parts.

Shared by preprocessing (which tokenizes the documents) and tokenizer training (which learns from
them); it imports neither. A part is a list of pieces in input order: whole files, byte ranges of
plain JSONL/text files (cut at line starts), or row-group ranges of Parquet files. The parts of a
split, read one after the other, give every document exactly once and in input order, so N sharded
runs merged are the unsharded run.
"""
from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import GaperonError

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".txt": "txt", ".text": "txt", ".md": "txt",
           ".parquet": "parquet"}


class PreprocessError(GaperonError):
    """A run-stopping problem, worded for the person who launched the run."""


class DocError(Exception):
    """One bad document. ``line_offset`` locates it inside a multi-line item (a whole text file)."""

    def __init__(self, reason: str, line_offset: int = 0):
        super().__init__(reason)
        self.reason, self.line_offset = reason, line_offset


class EmptyDocument(DocError):
    """A document with no text at all: skipped and counted whatever ``on_error`` says (it has no
    tokens to keep, and the one-sequence-per-document format cannot hold an empty one)."""


def input_format(path: str) -> str:
    p = Path(path)
    suffix = Path(p.stem).suffix if p.suffix == ".gz" else p.suffix
    if suffix not in FORMATS or (p.suffix == ".gz" and FORMATS[suffix] == "parquet"):
        raise PreprocessError(f"{path}: unknown input format {suffix or '(no extension)'!r}; expected "
                              ".jsonl, .txt or .parquet (.jsonl.gz and .txt.gz too)")
    return FORMATS[suffix]


def file_format(path: str, txt_mode: str) -> str:
    """jsonl, txt (one document per file), txt-lines (one per line) or parquet."""
    fmt = input_format(path)
    return "txt-lines" if fmt == "txt" and txt_mode == "lines" else fmt


# ------------------------------------------------------------------------------------ pieces

@dataclass
class Piece:
    """Part of one input file: bytes [start, end) of a line-based file (each line whose first byte
    is in the range), row groups [start, end) of a Parquet file, or the whole file (end = -1)."""

    path: str
    fmt: str
    start: int = 0
    end: int = -1
    first_line: int | None = None  # 1-based line/row of the piece's first document, once known

    def describe(self) -> dict:
        kind = "rows" if self.fmt == "parquet" else "bytes"
        return {"path": self.path, kind: [self.start, self.end]} if self.end >= 0 else {"path": self.path}

    def line(self, index: int) -> int:
        """The file's line (or row) number of the piece's ``index``-th document (0-based). For a byte
        range the lines before it are counted here, once, and only when a message needs them."""
        if self.first_line is None:
            newlines = 0
            with open(self.path, "rb") as f:
                left = self._aligned_start(f)
                f.seek(0)
                while left > 0:
                    block = f.read(min(left, 1 << 24))
                    newlines += block.count(b"\n")
                    left -= len(block)
            self.first_line = newlines + 1
        return self.first_line + index

    def _aligned_start(self, f) -> int:
        """Offset of the first line that starts at or after ``start``."""
        if self.start <= 0:
            return 0
        f.seek(self.start - 1)
        f.readline()  # the rest of the line holding byte start-1 belongs to the previous piece
        return f.tell()

    def items(self, text_key: str) -> Iterator[object]:
        """The raw payload of each document, in order (parsed later, in the workers)."""
        if self.fmt == "parquet":
            yield from _parquet_values(self.path, text_key, self.start, self.end)
            return
        with _open(self.path) as f:
            if self.fmt == "txt":  # the whole file is one document
                yield f.read()
                return
            if self.end < 0:
                yield from f
                return
            pos = self._aligned_start(f)
            while pos < self.end:
                line = f.readline()
                if not line:
                    return
                yield line
                pos += len(line)


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _parquet_file(path: str, text_key: str):
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_key not in pf.schema_arrow.names:
        raise PreprocessError(f"{path}: no column {text_key!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                              "set --text-key")
    return pf


def _parquet_values(path: str, text_key: str, start: int, end: int) -> Iterator[object]:
    pf = _parquet_file(path, text_key)
    groups = range(pf.num_row_groups) if end < 0 else range(start, end)
    if not groups:
        return
    for batch in pf.iter_batches(columns=[text_key], batch_size=1024, row_groups=list(groups)):
        yield from batch.column(0).to_pylist()


def _units(path: str, fmt: str, text_key: str) -> list[tuple[int, Piece | None]]:
    """(weight, piece) in file order. A ``None`` piece is a byte-splittable file of that many bytes."""
    if fmt == "parquet":
        meta = _parquet_file(path, text_key).metadata
        rows = 0
        out = []
        for g in range(meta.num_row_groups):
            out.append((meta.row_group(g).total_byte_size, Piece(path, fmt, g, g + 1, first_line=rows + 1)))
            rows += meta.row_group(g).num_rows
        return out
    size = os.path.getsize(path)
    if fmt == "txt" or path.endswith(".gz"):  # one document, or a stream that cannot be entered midway
        return [(size, Piece(path, fmt, first_line=1))]
    return [(size, None)]


def split(paths: list[str], txt_mode: str, text_key: str, shard: int, shards: int) -> list[Piece]:
    """The pieces of part ``shard`` (0-based) of ``shards``: the inputs' bytes laid end to end and
    cut into equal ranges; a line (or an unsplittable unit: Parquet row group, gzip file, whole
    text document) belongs to the range holding its first byte."""
    units = []  # (global start, weight, piece or None, path, fmt)
    total = 0
    for path in paths:
        fmt = file_format(path, txt_mode)
        for weight, piece in _units(path, fmt, text_key):
            units.append((total, weight, piece, path, fmt))
            total += weight
    lo, hi = shard * total // shards, (shard + 1) * total // shards
    last = shard == shards - 1
    out: list[Piece] = []
    for start, weight, piece, path, fmt in units:
        if piece is not None:  # whole unit: in this part if its first byte is (empty units: where they sit)
            if lo <= start < hi or (last and start >= hi):
                if out and out[-1].path == path and out[-1].fmt == "parquet" and out[-1].end == piece.start:
                    out[-1].end = piece.end  # consecutive row groups: one piece
                else:
                    out.append(piece)
            continue
        a, b = max(lo, start) - start, min(hi, start + weight) - start
        if a == 0 and b == weight:
            out.append(Piece(path, fmt, first_line=1))
        elif a < b:
            out.append(Piece(path, fmt, a, b, first_line=1 if a == 0 else None))
    return out


def read_items(path: str, fmt: str, text_key: str) -> Iterator[tuple[int, object]]:
    """(1-based line or row, raw payload) of every document of one file."""
    yield from enumerate(Piece(path, fmt, first_line=1).items(text_key), start=1)


# ----------------------------------------------------------------------------------- parsing

def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        raise DocError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start - line_start + 1})",
                       raw.count(b"\n", 0, e.start)) from None


def parse(fmt: str, payload, text_key: str) -> str:
    """The text of one document, or DocError saying what is wrong with it. Whitespace-only text is
    a document (kept as text, as Megatron-LM keeps it); no text at all is ``EmptyDocument``."""
    if fmt == "jsonl":
        line = _decode(payload)
        if not line.strip():
            raise DocError("blank line (expected one JSON object per line)")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DocError(f"malformed JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DocError(f"malformed JSON: expected an object, got {type(obj).__name__}")
        if text_key not in obj:
            raise DocError(f"missing key {text_key!r} (keys: {', '.join(sorted(obj)) or 'none'})")
        text = obj[text_key]
        if not isinstance(text, str):
            raise DocError(f"key {text_key!r} is not a string (got {type(text).__name__})")
        if "\\u" in line:  # JSON escapes can make lone surrogates, which no tokenizer can encode
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DocError(f"not valid Unicode (lone surrogate \\u{ord(text[e.start]):04x} at character "
                               f"{e.start + 1} of {text_key!r})") from None
    elif fmt == "txt":
        text = _decode(payload)
    elif fmt == "txt-lines":
        text = _decode(payload).rstrip("\r\n")
    else:  # parquet
        if payload is None:
            raise DocError(f"missing text (null {text_key!r})")
        text = _decode(payload) if isinstance(payload, bytes) else str(payload)
    if not text:
        raise EmptyDocument("empty document")
    return text


def iter_texts(files, text_key: str = "text", txt_mode: str = "doc") -> Iterator[str]:
    """The valid documents' texts, in order, bad ones passed over (for tokenizer training)."""
    for path in [str(f) for f in files]:
        fmt = file_format(path, txt_mode)
        for _, payload in read_items(path, fmt, text_key):
            try:
                yield parse(fmt, payload, text_key)
            except DocError:
                continue
