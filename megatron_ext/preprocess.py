"""Raw documents (JSONL, text, Parquet) -> Megatron-Core indexed dataset (``prefix.bin``/``.idx``).

Each document becomes one sequence ``encode(text) + [eos]``, written once, in input order. The
main process reads raw lines and writes; worker processes decode, parse, validate and tokenize
chunks of documents, and results are taken back strictly in submission order, so the output does
not depend on the number of workers. Bad documents stop the run (``on_error="fail"``) or are
counted and reported by ``file:line`` (``"skip"``); documents with no text at all are always
skipped and counted (whitespace-only ones are kept, as text). The dataset is built under
temporary names and renamed at the end (``.idx`` last: it is what makes a prefix exist), so an
interrupted run never leaves a half-written dataset under the final name.

At scale the input is cut into N parts (``shard=(i, n)``, see readers.split), each written as
``prefix.part-i-of-n.{bin,idx}`` plus a JSON sidecar (settings, tokenizer hash, counts, timings)
written last: a part is complete when its sidecar names its files' sizes. :func:`merge` streams
the parts into ``prefix.bin/.idx``, byte-identical to the unsharded run, and writes a report.
"""
from __future__ import annotations

import ctypes
import glob
import json
import multiprocessing as mp
import os
import re
import resource
import signal
import socket
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import idx_format
from .errors import unwritable  # noqa: F401  (preprocess.unwritable: callers use it)
from .dataset_parts import (MAX_LISTED, SIDECAR_FORMAT, _temp_name, _write_json, dataset_tokens,  # noqa: F401
                            existing_dataset, merge, output_prefix_problem, part_prefix, part_problem,
                            report_text)
from .readers import DocError, EmptyDocument, Piece, PreprocessError, input_format, parse, split
from .tokenizer import check_vocab_fits, fast_encoder, load_tokenizer, tokenizer_fingerprint

__all__ = ["PreprocessError", "Summary", "preprocess", "merge", "part_prefix", "dataset_tokens", "unwritable"]



class WorkerLost(PreprocessError):
    """A tokenizing process died (the out-of-memory killer, most often)."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM (SLURM's scancel and time limit) or SIGUSR1, handled like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class Summary:
    documents: int = 0
    tokens: int = 0
    bytes_in: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    skipped_count: int = 0
    skipped: list[tuple[str, int, str]] = field(default_factory=list)  # (file, line, reason), capped
    encoder: str = "hf"
    resumed: bool = False  # a complete part was found and kept

    def skip(self, path: str, line: int, reason: str) -> None:
        self.skipped_count += 1
        if len(self.skipped) < MAX_LISTED:
            self.skipped.append((path, line, reason))

    def report(self, max_listed: int = 20) -> str:
        rate = max(self.seconds, 1e-9)
        lines = [f"documents: {self.documents:,}  tokens: {self.tokens:,} (incl. one EOS per document)  "
                 f"bytes in: {self.bytes_in:,}  skipped: {self.skipped_count:,}",
                 f"time: {self.seconds:.1f} s  ({self.documents / rate:,.0f} docs/s, "
                 f"{self.tokens / rate:,.0f} tokens/s; encoder: {self.encoder})"]
        lines += [f"  skipped {path}:{line}: {reason}" for path, line, reason in self.skipped[:max_listed]]
        if self.skipped_count > min(max_listed, len(self.skipped)):
            lines.append(f"  ... and {self.skipped_count - min(max_listed, len(self.skipped)):,} more skipped documents")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------- signals

@contextmanager
def stop_signals():
    """SIGTERM and SIGUSR1 raise :class:`Interrupted` in the main thread while the run lasts, so the
    same cleanup as Ctrl-C runs (temporaries removed, workers stopped)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    stopping = []

    def stop(signum, _frame):
        if not stopping:  # once: a second signal must not interrupt the cleanup of the first
            stopping.append(signum)
            raise Interrupted(signum)

    old = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


# -------------------------------------------------------------------------------------- tokenizing

_WORKER = {}


def _die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel kills this process when its parent dies (even by SIGKILL), so no worker
    outlives the run idle; and the parent alone handles stop signals (it stops the workers)."""
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _init_worker(tokenizer_path: str, eos_token: str | None, use_fast: bool, parent_pid: int | None = None) -> None:
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    tok = load_tokenizer(tokenizer_path, eos_token=eos_token)
    fast = None
    if use_fast:  # the main process proved it on this data; re-read here, nothing to check again
        from .fast_bpe import FastBPE
        fast = FastBPE.from_file(tok.json_file)[0].encode
    _WORKER.update(tok=tok, fast=fast)


def _tokenize_chunk(fmt: str, text_key: str, payloads: list) -> tuple[list, int | None]:
    """Per document: int32 ids ending in EOS, or (reason, line_offset, empty) for a bad one; and
    the index of a document on which the fast encoder and HF disagree (one is checked per chunk)."""
    tok, fast = _WORKER["tok"], _WORKER["fast"]
    encode = fast or tok.encode
    out, checked, differs = [], fast is None, None
    for payload in payloads:
        try:
            text = parse(fmt, payload, text_key)
        except DocError as e:
            out.append((e.reason, e.line_offset, isinstance(e, EmptyDocument)))
            continue
        ids = encode(text)
        if not checked:
            checked = True
            if tok.encode(text) != ids:
                differs = len(out)
        arr = np.empty(len(ids) + 1, dtype=np.int32)
        arr[:-1] = ids
        arr[-1] = tok.eos_id
        out.append(arr)
    return out, differs


def _chunks(pieces: list[Piece], text_key, chunk_docs, chunk_bytes):
    """(piece, first index in piece, payloads) groups of consecutive documents of one piece."""
    for piece in pieces:
        payloads, size, first = [], 0, 0
        for payload in piece.items(text_key):
            payloads.append(payload)
            size += len(payload) if payload is not None else 0
            if len(payloads) >= chunk_docs or size >= chunk_bytes:
                yield piece, first, payloads
                first += len(payloads)
                payloads, size = [], 0
        if payloads:
            yield piece, first, payloads


def _kill(pool: ProcessPoolExecutor, procs: dict) -> None:
    for p in procs.values():
        if p.is_alive():
            p.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def _worker_deaths(procs) -> str:
    codes = sorted({p.exitcode for p in procs if p.exitcode not in (None, 0)})
    how = ", ".join(f"killed by {signal.Signals(-c).name}" if c < 0 else f"exit {c}" for c in codes)
    return how or "it died"


def _ordered_results(chunks, text_key, workers, init_args, output_prefix, local: dict):
    """Yield (chunk, (results, differs)) in chunk order. At most 2 chunks per worker are in flight,
    so memory stays bounded whatever the input size. A worker that dies is one WorkerLost error.
    ``local``: the tokenizer and fast encoder already loaded, used when there is no pool."""
    if workers <= 1:
        _WORKER.update(local)
        for chunk in chunks:
            yield chunk, _tokenize_chunk(chunk[0].fmt, text_key, chunk[2])
        return
    # spawn, not fork: the parent may hold Rust tokenizer threads or torch state that fork would copy.
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                               initargs=(*init_args, os.getpid()))
    procs = {}  # pid -> process, kept here: a broken pool forgets its processes
    try:
        pending = deque()
        try:
            for chunk in chunks:
                pending.append((chunk, pool.submit(_tokenize_chunk, chunk[0].fmt, text_key, chunk[2])))
                procs.update(pool._processes)
                if len(pending) >= 2 * workers:
                    chunk0, future = pending.popleft()
                    yield chunk0, future.result()
            while pending:
                chunk0, future = pending.popleft()
                yield chunk0, future.result()
        except BrokenProcessPool:
            for p in procs.values():
                p.join(5)
            raise WorkerLost(f"a tokenizing worker process died ({_worker_deaths(procs.values())}; SIGKILL is most often "
                             f"the out-of-memory killer): nothing written under {output_prefix}; rerun with "
                             "fewer --workers, a smaller --chunk-docs, or more memory") from None
        pool.shutdown(wait=True)  # all done: reap the workers (their CPU time then shows in getrusage)
    finally:
        _kill(pool, procs)


# ----------------------------------------------------------------------------------------- writing

def _cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def clean_stale_temporaries(prefix: str, idle_s: float = 600.0) -> list[str]:
    """Remove ``prefix.tmp-HOST-PID.*`` left by killed runs: those of this host whose process is
    gone, and any not written to for ``idle_s`` (a live writer appends every few milliseconds)."""
    removed = []
    here, now = socket.gethostname(), time.time()
    for path in glob.glob(glob.escape(prefix) + ".tmp-*"):
        m = re.fullmatch(r"(.*)-(\d+)(\.\w+)?", path[len(prefix) + len(".tmp-"):])
        try:
            idle = now - os.path.getmtime(path)
        except OSError:
            continue
        dead = False
        if m and m.group(1) == here:
            try:
                os.kill(int(m.group(2)), 0)
            except ProcessLookupError:
                dead = True
            except PermissionError:
                pass
        if dead or idle > idle_s:
            Path(path).unlink(missing_ok=True)
            removed.append(path)
    return removed


class _AtomicDataset:
    """Megatron's indexed dataset (one sequence per document, the bytes its IndexedDatasetBuilder
    writes) into ``prefix.tmp-HOST-PID.{bin,idx}``, renamed on commit. Written here rather than
    through megatron.core, whose import (torch, torch.compile, Transformer Engine probes) was
    most of a preprocessing run's start-up."""

    def __init__(self, prefix: str, vocab_size: int):
        self.prefix, self.tmp = prefix, _temp_name(prefix)
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        # Megatron's DType.optimal_dtype
        self.dtype = np.dtype(np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32)
        self.code = next(c for c, t in idx_format.DTYPES.items() if np.dtype(t) == self.dtype)
        self.data = open(self.tmp + ".bin", "wb")  # noqa: SIM115 - closed by commit/discard
        self.lengths: list[int] = []

    def add(self, ids: np.ndarray) -> None:
        self.data.write(np.asarray(ids, dtype=self.dtype).tobytes(order="C"))
        self.lengths.append(len(ids))

    def commit(self) -> None:
        self.data.close()
        n = len(self.lengths)
        lengths = np.array(self.lengths, dtype=np.int32)
        pointers = np.zeros(n, dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(self.tmp + ".idx", "wb") as f:
            f.write(idx_format.pack(self.code, n, n + 1))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(np.arange(n + 1, dtype=np.int64).tobytes(order="C"))  # one sequence per document
        Path(self.prefix + ".idx").unlink(missing_ok=True)  # never pair a new .bin with an old .idx
        os.replace(self.tmp + ".bin", self.prefix + ".bin")
        os.replace(self.tmp + ".idx", self.prefix + ".idx")

    def discard(self) -> None:
        self.data.close()
        for ext in (".bin", ".idx"):
            Path(self.tmp + ext).unlink(missing_ok=True)


def _good_documents(piece: Piece, first: int, results: list, on_error: str, summary: Summary) -> list:
    """A chunk's token arrays, after its bad documents were all checked: in ``fail`` mode the first
    one raises before anything of the chunk is written; in ``skip`` mode each is recorded."""
    for i, result in enumerate(results):
        if isinstance(result, tuple):
            reason, offset, empty = result
            line = piece.line(first + i) + offset
            if on_error == "fail" and not empty:
                raise PreprocessError(f"{piece.path}:{line}: {reason} "
                                      "(use --on-error skip to pass over bad documents)")
            summary.skip(piece.path, line, reason)
    return [r for r in results if isinstance(r, np.ndarray)]


def _choose_encoder(tok, encoder: str, chunks, text_key: str):
    """(the fast encode function or None, why not fast, the chunks to process). It is checked here on
    the adversarial texts and the first chunk's documents; ``encoder='fast'`` makes a failed check
    an error."""
    if encoder == "hf":
        return None, None, chunks
    first = next(chunks, None)
    sample = []
    if first is not None:
        for payload in first[2][:200]:
            try:
                sample.append(parse(first[0].fmt, payload, text_key))
            except DocError:
                pass
    fast, why = fast_encoder(tok, sample)
    if fast is None and encoder == "fast":
        raise PreprocessError(f"--encoder fast: the fast encoder cannot be used with {tok.path}: {why}; "
                              "use --encoder auto (falls back to Hugging Face tokenizers)")

    def again():
        if first is not None:
            yield first
        yield from chunks

    return fast, why, again()


# ------------------------------------------------------------------------------------- sidecars

def run_settings(inputs: list[str], tokenizer: str, tok, text_key: str, txt_mode: str, on_error: str,
                 eos_token: str | None, shards: int) -> dict:
    """What must be equal for parts to belong to one dataset (and for a complete part to be kept)."""
    return {"tokenizer": {"path": os.path.abspath(tokenizer), "sha256": tokenizer_fingerprint(tokenizer),
                          "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
            "inputs": [{"path": os.path.abspath(p), "bytes": os.path.getsize(p)} for p in inputs],
            "text_key": text_key, "txt_mode": txt_mode, "on_error": on_error, "eos_token": eos_token,
            "shards": shards}


# ------------------------------------------------------------------------------------------ runs

def preprocess(inputs, output_prefix: str, tokenizer: str, workers: int = 1, text_key: str = "text",
               txt_mode: str = "doc", on_error: str = "fail", model_vocab_size: int | None = None,
               eos_token: str | None = None, chunk_docs: int = 1000, chunk_bytes: int = 1 << 20,
               progress: bool = True, shard: tuple[int, int] | None = None, encoder: str = "auto",
               redo: bool = False, overwrite: bool = False) -> Summary:
    """Tokenize ``inputs`` into ``output_prefix.bin/.idx``, or with ``shard=(i, n)`` part i of n into
    ``output_prefix.part-i-of-n.*`` (a complete part made with the same settings is kept, unless
    ``redo``). Raises PreprocessError (nothing written under the final name) on a bad document in
    ``fail`` mode, a missing input, or (unsharded) no valid document. An existing dataset under
    ``output_prefix`` (unsharded) is replaced only with ``overwrite``."""
    from tqdm import tqdm

    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', not {on_error!r}")
    if txt_mode not in ("doc", "lines"):
        raise ValueError(f"txt_mode must be 'doc' or 'lines', not {txt_mode!r}")
    if encoder not in ("auto", "fast", "hf"):
        raise ValueError(f"encoder must be 'auto', 'fast' or 'hf', not {encoder!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise PreprocessError(f"--workers {workers} must be >= 1: the number of tokenizing processes "
                              "(1: no worker pool)")
    index, shards = shard or (0, 1)
    if not (shards >= 1 and 0 <= index < shards):
        raise PreprocessError(f"--shard {index}/{shards}: write I/N with 0 <= I < N (I: this part, from 0; "
                              "N: the number of parts), e.g. --shard $SLURM_ARRAY_TASK_ID/16")
    inputs = [str(p) for p in inputs]
    output_prefix = str(output_prefix)
    for path in inputs:
        if not os.path.isfile(path):
            raise PreprocessError(f"{path}: no such input file")
        input_format(path)
    problem = output_prefix_problem(output_prefix)  # before any tokenizing: a bad path costs a second
    if problem:
        raise PreprocessError(problem)
    if not shard and not overwrite:
        held = existing_dataset(output_prefix)
        if held:
            raise PreprocessError(f"--output-prefix {output_prefix}: {held}; pass --overwrite to replace it, or "
                                  "choose another --output-prefix")
    tok = load_tokenizer(tokenizer, eos_token=eos_token)
    if model_vocab_size is not None:
        check_vocab_fits(tok.vocab_size, model_vocab_size)
    final = part_prefix(output_prefix, index, shards) if shard else output_prefix
    settings = run_settings(inputs, str(tokenizer), tok, text_key, txt_mode, on_error, eos_token, shards)
    if shard and not redo and part_problem(final, settings) is None:
        meta = json.loads(Path(final + ".json").read_text(encoding="utf-8"))
        return Summary(documents=meta["documents"], tokens=meta["tokens"], bytes_in=meta["bytes_in"],
                       skipped_count=meta["skipped_count"], encoder=meta["encoder"], resumed=True,
                       skipped=[tuple(s) for s in meta["skipped"]])
    clean_stale_temporaries(final)
    pieces = split(inputs, txt_mode, text_key, index, shards)

    summary = Summary(bytes_in=_piece_bytes(pieces))
    start, cpu0 = time.perf_counter(), _cpu_seconds()
    bar = tqdm(unit="doc", desc=Path(final).name, disable=not progress, mininterval=1.0, smoothing=0.1)
    out = None  # opened with the first good chunk: bad input at the start fails in a second, not after
    with stop_signals():
        try:      # megatron.core's ~10 s import, and the workers' first chunks overlap that import
            chunks = _chunks(pieces, text_key, chunk_docs, chunk_bytes)
            fast, why_not, chunks = _choose_encoder(tok, encoder, chunks, text_key)
            summary.encoder = "fast" if fast else "hf"
            if why_not and progress:
                print(f"note: Hugging Face tokenizers encode (the fast encoder is not used: {why_not})")
            init = (str(tokenizer), eos_token, fast is not None)
            with closing(_ordered_results(chunks, text_key, workers, init, final, {"tok": tok, "fast": fast})) as ordered:
                for (piece, first, payloads), (results, differs) in ordered:
                    if differs is not None:
                        raise PreprocessError(
                            f"{piece.path}:{piece.line(first + differs)}: the fast encoder's ids differ from Hugging "
                            "Face tokenizers' on this document: rerun with --encoder hf (and report it)")
                    for ids in _good_documents(piece, first, results, on_error, summary):
                        out = out or _AtomicDataset(final, tok.vocab_size)
                        out.add(ids)
                        summary.documents += 1
                        summary.tokens += len(ids)
                    bar.update(len(payloads))
                    rate = summary.tokens / max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
            if out is None and not shard:
                raise PreprocessError(f"no valid document in {', '.join(inputs)} ({summary.skipped_count} skipped)")
            out = out or _AtomicDataset(final, tok.vocab_size)  # an empty part still merges
            summary.seconds, summary.cpu_seconds = time.perf_counter() - start, _cpu_seconds() - cpu0
            if shard:
                Path(final + ".json").unlink(missing_ok=True)  # the part is incomplete from here on
            out.commit()
            if shard:
                _write_json(final + ".json", _sidecar(final, settings, index, pieces, summary))
        except BaseException:
            if out is not None:
                out.discard()
            raise
        finally:
            bar.close()
    return summary


def _piece_bytes(pieces: list[Piece]) -> int:
    total = 0
    for p in pieces:
        if p.fmt != "parquet" and p.end >= 0:
            total += p.end - p.start
        elif p.fmt != "parquet" or p.end < 0:
            total += os.path.getsize(p.path)
        else:
            import pyarrow.parquet as pq
            meta = pq.ParquetFile(p.path).metadata
            total += sum(meta.row_group(g).total_byte_size for g in range(p.start, p.end))
    return total


def _sidecar(prefix: str, settings: dict, index: int, pieces: list[Piece], s: Summary) -> dict:
    return {"format": SIDECAR_FORMAT, "settings": settings, "shard": index, "pieces": [p.describe() for p in pieces],
            "documents": s.documents, "tokens": s.tokens, "bytes_in": s.bytes_in, "skipped_count": s.skipped_count,
            "skipped": [list(x) for x in s.skipped], "seconds": round(s.seconds, 3),
            "cpu_seconds": round(s.cpu_seconds, 3), "encoder": s.encoder, "host": socket.gethostname(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": {ext: os.path.getsize(prefix + ext) for ext in (".bin", ".idx")}}

