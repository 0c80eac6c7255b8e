"""Raw documents (JSONL, text, Parquet) -> Megatron-Core indexed dataset (``prefix.bin``/``.idx``).

Each document becomes one sequence ``encode(text) + [eos]``, written once, in input order. The
main process reads raw lines and writes; worker processes decode, parse, validate and tokenize
chunks of documents, and results are taken back strictly in submission order, so the output does
not depend on the number of workers. Bad documents stop the run (``on_error="fail"``) or are
counted and reported by ``file:line`` (``"skip"``). The dataset is built under temporary names and
renamed at the end (``.idx`` last: it is what makes a prefix exist), so an interrupted run never
leaves a half-written dataset under the final name.
"""
from __future__ import annotations

import gzip
import json
import multiprocessing as mp
import os
import time
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from .tokenizer import check_vocab_fits, load_tokenizer

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".txt": "txt", ".text": "txt", ".md": "txt",
           ".parquet": "parquet"}


class PreprocessError(Exception):
    """A run-stopping problem, worded for the person who launched the run."""


class DocError(Exception):
    """One bad document. ``line_offset`` locates it inside a multi-line item (a whole text file)."""

    def __init__(self, reason: str, line_offset: int = 0):
        super().__init__(reason)
        self.reason, self.line_offset = reason, line_offset


@dataclass
class Summary:
    documents: int = 0
    tokens: int = 0
    bytes_in: int = 0
    seconds: float = 0.0
    skipped: list[tuple[str, int, str]] = field(default_factory=list)  # (file, line, reason)

    def report(self, max_listed: int = 20) -> str:
        rate = max(self.seconds, 1e-9)
        lines = [f"documents: {self.documents:,}  tokens: {self.tokens:,} (incl. one EOS per document)  "
                 f"bytes in: {self.bytes_in:,}  skipped: {len(self.skipped):,}",
                 f"time: {self.seconds:.1f} s  ({self.documents / rate:,.0f} docs/s, "
                 f"{self.tokens / rate:,.0f} tokens/s)"]
        lines += [f"  skipped {path}:{line}: {reason}" for path, line, reason in self.skipped[:max_listed]]
        if len(self.skipped) > max_listed:
            lines.append(f"  ... and {len(self.skipped) - max_listed:,} more skipped documents")
        return "\n".join(lines)


def unwritable(directory: str | os.PathLike) -> str | None:
    """Why files cannot be created in ``directory`` (made, with its parents, if missing), or None.

    Nothing is created to find out: the nearest existing ancestor must be a directory we may
    write into (a path under a regular file fails even for root, a read-only one for other users).
    """
    p = Path(os.path.abspath(directory))
    missing = []
    while not p.exists() and p != p.parent:
        missing.append(p.name)
        p = p.parent
    if not p.is_dir():
        return f"{p} is a file, not a directory" + (f", so {Path(p, *reversed(missing))} cannot be created"
                                                    if missing else "")
    if not os.access(p, os.W_OK | os.X_OK):
        what = f"cannot create {Path(p, *reversed(missing))}: " if missing else ""
        return f"{what}{p} is not writable"
    return None


def output_prefix_problem(output_prefix: str) -> str | None:
    """Why ``output_prefix``.bin/.idx cannot be written, or None (checked before any work)."""
    if not output_prefix or output_prefix.endswith(("/", os.sep)):
        return f"--output-prefix {output_prefix!r} names a directory; give a file prefix such as data/mix"
    for ext in (".bin", ".idx"):
        if os.path.isdir(output_prefix + ext):
            return f"{output_prefix}{ext} is a directory; choose another --output-prefix"
    reason = unwritable(Path(output_prefix).parent)
    return f"--output-prefix {output_prefix}: {reason}; choose a writable location" if reason else None


# ----------------------------------------------------------------------------------------- reading

def input_format(path: str) -> str:
    p = Path(path)
    suffix = Path(p.stem).suffix if p.suffix == ".gz" else p.suffix
    if suffix not in FORMATS or (p.suffix == ".gz" and FORMATS[suffix] == "parquet"):
        raise PreprocessError(f"{path}: unknown input format {suffix or '(no extension)'!r}; expected "
                              ".jsonl, .txt or .parquet (.jsonl.gz and .txt.gz too)")
    return FORMATS[suffix]


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _format(path: str, txt_mode: str) -> str:
    fmt = input_format(path)
    return "txt-lines" if fmt == "txt" and txt_mode == "lines" else fmt


def read_items(path: str, fmt: str, text_key: str) -> Iterator[tuple[int, object]]:
    """(1-based line or row, raw payload) per document; payloads are parsed in the workers."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if text_key not in pf.schema_arrow.names:
            raise PreprocessError(f"{path}: no column {text_key!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                                  "set --text-key")
        row = 0
        for batch in pf.iter_batches(columns=[text_key], batch_size=1024):
            for value in batch.column(0).to_pylist():
                row += 1
                yield row, value
        return
    with _open(path) as f:
        if fmt == "txt":  # the whole file is one document
            yield 1, f.read()
        else:
            yield from enumerate(f, start=1)


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        raise DocError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start - line_start + 1})",
                       raw.count(b"\n", 0, e.start)) from None


def parse(fmt: str, payload, text_key: str) -> str:
    """The text of one document, or DocError saying what is wrong with it."""
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
    elif fmt == "txt":
        text = _decode(payload)
    elif fmt == "txt-lines":
        text = _decode(payload).rstrip("\r\n")
    else:  # parquet
        if payload is None:
            raise DocError(f"missing text (null {text_key!r})")
        text = _decode(payload) if isinstance(payload, bytes) else str(payload)
    if not text.strip():
        raise DocError("empty document")
    return text


# -------------------------------------------------------------------------------------- tokenizing

_TOKENIZER = None


def _init_worker(tokenizer_path: str, eos_token: str | None) -> None:
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(tokenizer_path, eos_token=eos_token)


def _tokenize_chunk(fmt: str, text_key: str, payloads: list) -> list:
    """Per document: int32 ids ending in EOS, or (reason, line_offset) for a bad document."""
    out = []
    for payload in payloads:
        try:
            text = parse(fmt, payload, text_key)
        except DocError as e:
            out.append((e.reason, e.line_offset))
            continue
        ids = _TOKENIZER.encode(text)
        arr = np.empty(len(ids) + 1, dtype=np.int32)
        arr[:-1] = ids
        arr[-1] = _TOKENIZER.eos_id
        out.append(arr)
    return out


def _chunks(inputs, text_key, txt_mode, chunk_docs, chunk_bytes):
    """(path, fmt, lines, payloads) groups of consecutive documents of one file."""
    for path in inputs:
        fmt = _format(path, txt_mode)
        lines, payloads, size = [], [], 0
        for line, payload in read_items(path, fmt, text_key):
            lines.append(line)
            payloads.append(payload)
            size += len(payload) if payload is not None else 0
            if len(payloads) >= chunk_docs or size >= chunk_bytes:
                yield path, fmt, lines, payloads
                lines, payloads, size = [], [], 0
        if payloads:
            yield path, fmt, lines, payloads


def _ordered_results(chunks, text_key, workers, init_args):
    """Yield (chunk, results) in chunk order. At most 2 chunks per worker are in flight, so memory
    stays bounded whatever the input size. A worker that dies (e.g. killed for memory) raises
    BrokenProcessPool here instead of hanging the run."""
    if workers <= 1:
        _init_worker(*init_args)
        for chunk in chunks:
            yield chunk, _tokenize_chunk(chunk[1], text_key, chunk[3])
        return
    # spawn, not fork: the parent may hold Rust tokenizer threads or torch state that fork would copy.
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                               initargs=init_args)
    try:
        pending = deque()
        for chunk in chunks:
            pending.append((chunk, pool.submit(_tokenize_chunk, chunk[1], text_key, chunk[3])))
            if len(pending) >= 2 * workers:
                chunk0, future = pending.popleft()
                yield chunk0, future.result()
        while pending:
            chunk0, future = pending.popleft()
            yield chunk0, future.result()
        pool.shutdown(wait=True)  # all done: reap the workers (their CPU time then shows in getrusage)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------------------- writing

class _AtomicDataset:
    """An IndexedDatasetBuilder writing ``prefix.tmp-PID.{bin,idx}``, renamed on commit."""

    def __init__(self, prefix: str, vocab_size: int):
        with warnings.catch_warnings():  # megatron.core warns about Transformer Engine/Apex: irrelevant here
            warnings.simplefilter("ignore")
            from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

        self.prefix, self.tmp = prefix, f"{prefix}.tmp-{os.getpid()}"
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        self.builder = IndexedDatasetBuilder(self.tmp + ".bin", dtype=DType.optimal_dtype(vocab_size))

    def add(self, ids: np.ndarray) -> None:
        self.builder.add_document(ids, [len(ids)])

    def commit(self) -> None:
        self.builder.finalize(self.tmp + ".idx")
        Path(self.prefix + ".idx").unlink(missing_ok=True)  # never pair a new .bin with an old .idx
        os.replace(self.tmp + ".bin", self.prefix + ".bin")
        os.replace(self.tmp + ".idx", self.prefix + ".idx")

    def discard(self) -> None:
        self.builder.data_file.close()
        for ext in (".bin", ".idx"):
            Path(self.tmp + ext).unlink(missing_ok=True)


def _good_documents(path: str, lines: list[int], results: list, on_error: str, skipped: list) -> list:
    """A chunk's token arrays, after its bad documents were all checked: in ``fail`` mode the first
    one raises before anything of the chunk is written; in ``skip`` mode each is recorded."""
    for line, result in zip(lines, results, strict=True):
        if isinstance(result, tuple):
            reason, offset = result
            if on_error == "fail":
                raise PreprocessError(f"{path}:{line + offset}: {reason} "
                                      "(use --on-error skip to pass over bad documents)")
            skipped.append((path, line + offset, reason))
    return [r for r in results if isinstance(r, np.ndarray)]


def preprocess(inputs, output_prefix: str, tokenizer: str, workers: int = 1, text_key: str = "text",
               txt_mode: str = "doc", on_error: str = "fail", model_vocab_size: int | None = None,
               eos_token: str | None = None, chunk_docs: int = 1000, chunk_bytes: int = 1 << 20,
               progress: bool = True) -> Summary:
    """Tokenize ``inputs`` into ``output_prefix.bin/.idx``. Raises PreprocessError (nothing written
    under the final name) on a bad document in ``fail`` mode, a missing input, or no valid document."""
    from tqdm import tqdm

    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    if txt_mode not in ("doc", "lines"):
        raise ValueError(f"txt_mode must be 'doc' or 'lines', not {txt_mode!r}")
    inputs = [str(p) for p in inputs]
    output_prefix = str(output_prefix)
    for path in inputs:
        if not os.path.isfile(path):
            raise PreprocessError(f"{path}: no such input file")
        input_format(path)
    problem = output_prefix_problem(output_prefix)  # before any tokenizing: a bad path costs a second
    if problem:
        raise PreprocessError(problem)
    tok = load_tokenizer(tokenizer, eos_token=eos_token)
    if model_vocab_size is not None:
        check_vocab_fits(tok.vocab_size, model_vocab_size)

    summary = Summary(bytes_in=sum(os.path.getsize(p) for p in inputs))
    start = time.perf_counter()
    bar = tqdm(unit="doc", desc=Path(output_prefix).name, disable=not progress, mininterval=1.0, smoothing=0.1)
    out = None  # opened with the first good chunk: bad input at the start fails in a second, not after
    try:        # megatron.core's ~10 s import, and the workers' first chunks overlap that import
        chunks = _chunks(inputs, text_key, txt_mode, chunk_docs, chunk_bytes)
        with closing(_ordered_results(chunks, text_key, workers, (str(tokenizer), eos_token))) as ordered:
            for (path, _, lines, _), results in ordered:
                for ids in _good_documents(path, lines, results, on_error, summary.skipped):
                    out = out or _AtomicDataset(output_prefix, tok.vocab_size)
                    out.add(ids)
                    summary.documents += 1
                    summary.tokens += len(ids)
                bar.update(len(lines))
                rate = summary.tokens / max(time.perf_counter() - start, 1e-9)
                bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
        if out is None:
            raise PreprocessError(f"no valid document in {', '.join(inputs)} ({len(summary.skipped)} skipped)")
        out.commit()
    except BaseException:
        if out is not None:
            out.discard()
        raise
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def iter_texts(files, text_key: str = "text", txt_mode: str = "doc") -> Iterator[str]:
    """The valid documents' texts, in order, bad ones passed over (for tokenizer training)."""
    for path in [str(f) for f in files]:
        fmt = _format(path, txt_mode)
        for _, payload in read_items(path, fmt, text_key):
            try:
                yield parse(fmt, payload, text_key)
            except DocError:
                continue
