"""Training samples: where they come from and which rank sees which.

A dataset maps a global sample index to ``{"tokens", "labels", "loss_mask"}`` (each [seq_len]).
Which indices a rank reads is a pure function of (consumed samples, data-parallel rank): every
rank of one tensor/pipeline group reads the same samples, and resuming from a checkpoint's
consumed-samples count continues with exactly the next sample.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from . import idx_format, inject
from .config import Recipe
from .errors import DataError  # noqa: F401  (defined below the schema; callers import it from here)


class SampleDataset(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]: ...


class SyntheticCopyTask:
    """Zipf-distributed token strings repeated twice. Two things to learn: the skewed unigram
    distribution (within a few steps) and copying the first half (by attention, over longer runs).
    Deterministic per (seed, index); nothing on disk."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int, size: int = 2**31 - 1):
        self.vocab_size, self.seq_len, self.seed, self.size = vocab_size, seq_len, seed, size
        weights = 1.0 / np.arange(1, vocab_size)
        self.probs = weights / weights.sum()

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        half = 1 + rng.choice(self.vocab_size - 1, size=(self.seq_len + 2) // 2, p=self.probs)
        seq = torch.from_numpy(np.concatenate([half, half])[: self.seq_len + 1]).long()
        return {"tokens": seq[:-1], "labels": seq[1:], "loss_mask": torch.ones(self.seq_len)}


class _TokenizerInfo:
    """What megatron's GPTDataset asks of a tokenizer: the end-of-document id and the vocab size."""

    def __init__(self, eod: int, vocab_size: int):
        # No ``pad``: our samples are never padded, and megatron then uses a pad id that cannot
        # occur (an EOS-valued pad would be refused with a warning per dataset anyway).
        self.eod, self.vocab_size = eod, vocab_size
        # Megatron writes this into the blend's cache description (its hash names the cache files).
        self.unique_identifiers = {"class": "GaperonTokenizer", "eod": eod, "vocab_size": vocab_size}


class MegatronSamples:
    """Adapts megatron's GPTDataset / BlendedDataset items to our three-key samples."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = self.dataset[index % len(self.dataset)]
        return {"tokens": item["tokens"], "labels": item["labels"], "loss_mask": item["loss_mask"].float()}


# ---- checking the data before anything is built ---------------------------------------------
# Megatron-Core's .idx (megatron_ext/idx_format.py).
_IDX_MAGIC, _IDX_HEADER, _IDX_DTYPES = idx_format.MAGIC, idx_format.HEADER_BYTES, idx_format.DTYPES
_FIRST_TOKENS = 1 << 16  # tokens of the first document read to check the ids (at most 256 KiB)


@dataclass
class IndexInfo:
    """What the header of an indexed dataset says (read by :func:`read_index`)."""

    prefix: str
    dtype: type
    sequences: int
    documents: int  # document boundaries - 1: what megatron splits into train/valid/test
    bin_bytes: int  # the .bin size the index implies


def _make_hint(prefix: str) -> str:
    return f"`python tools/preprocess_data.py --input DOCS --output-prefix {prefix} --tokenizer TOK`"


def _read_at(f, offset: int, dtype, count: int = 1) -> np.ndarray:
    f.seek(offset)
    return np.frombuffer(f.read(count * np.dtype(dtype).itemsize), dtype=dtype, count=count)


def read_index(prefix: str, where: str = "data.blend") -> IndexInfo:
    """The header of ``prefix``.idx, checked against the .idx and .bin sizes: a few small reads,
    never the whole file. Raises DataError naming the file and the fix."""
    idx, bin_ = f"{prefix}.idx", f"{prefix}.bin"
    has_idx, has_bin = os.path.isfile(idx), os.path.isfile(bin_)
    if not (has_idx and has_bin):
        stem = prefix[:-4] if prefix.endswith((".bin", ".idx")) else None
        if stem and os.path.isfile(stem + ".idx") and os.path.isfile(stem + ".bin"):
            raise DataError(f"{where} names {prefix}, a file; it takes dataset prefixes: write {stem} "
                            "(without .bin/.idx)")
        if not has_idx and not has_bin:
            raise DataError(f"{where}: no dataset at {prefix} ({bin_} and {idx} do not exist): fix the path, "
                            f"or create it with {_make_hint(prefix)}")
        there, gone = (bin_, idx) if has_bin else (idx, bin_)
        raise DataError(f"{gone} is missing ({there} is there; {where} names {prefix}): an incomplete copy? "
                        f"copy {gone} too, or re-create both with {_make_hint(prefix)}")
    redo = f"re-create it with {_make_hint(prefix)} (or copy it again)"
    try:
        idx_bytes, bin_bytes = os.path.getsize(idx), os.path.getsize(bin_)
        with open(idx, "rb") as f:
            head = f.read(_IDX_HEADER)
            header = idx_format.parse(head)
            if header is None:
                what = (f"truncated ({idx_bytes} bytes, shorter than the {_IDX_HEADER}-byte header)"
                        if len(head) < _IDX_HEADER and _IDX_MAGIC.startswith(head[:len(_IDX_MAGIC)])
                        else f"not a Megatron indexed-dataset index (bad magic {head[:len(_IDX_MAGIC)]!r})")
                raise DataError(f"{idx}: {what}: {redo}")
            version, code, sequences, boundaries = header
            if version != 1 or code not in _IDX_DTYPES:
                raise DataError(f"{idx}: corrupt header (version {version}, dtype code {code}; expected version 1 "
                                f"and a code in 1-8): {redo}")
            want = header.index_bytes()
            if idx_bytes != want:
                raise DataError(f"{idx}: {'truncated' if idx_bytes < want else 'corrupt'}: its header says "
                                f"{sequences:,} sequences and {boundaries:,} document indices, which take {want:,} "
                                f"bytes, but the file has {idx_bytes:,}: {redo}")
            if sequences == 0 or boundaries < 2:
                raise DataError(f"{prefix}: empty dataset (0 documents in {idx}): remove it from {where}, or "
                                f"re-create it from non-empty input with {_make_hint(prefix)}")
            pointers = _IDX_HEADER + 4 * sequences
            doc_index = pointers + 8 * sequences
            first_len, last_len = int(_read_at(f, _IDX_HEADER, np.int32)[0]), int(
                _read_at(f, pointers - 4, np.int32)[0])
            first_ptr, last_ptr = int(_read_at(f, pointers, np.int64)[0]), int(
                _read_at(f, doc_index - 8, np.int64)[0])
            first_doc, last_doc = int(_read_at(f, doc_index, np.int64)[0]), int(
                _read_at(f, want - 8, np.int64)[0])
    except OSError as err:
        raise DataError(f"{getattr(err, 'filename', None) or idx}: cannot be read ({err.strerror or err}): "
                        "check its permissions") from None
    if first_len < 0 or last_len < 0 or first_ptr != 0 or last_ptr < 0 or first_doc != 0 or last_doc != sequences:
        raise DataError(f"{idx}: corrupt index (first pointer {first_ptr}, document indices {first_doc}..{last_doc} "
                        f"for {sequences:,} sequences): {redo}")
    dtype = _IDX_DTYPES[code]
    expected = last_ptr + last_len * np.dtype(dtype).itemsize
    if bin_bytes != expected:
        what = ("truncated (an interrupted copy?)" if bin_bytes < expected
                else "longer than its index says (a .bin and an .idx of different datasets?)")
        raise DataError(f"{bin_}: {bin_bytes:,} bytes, but {idx} says {expected:,} ({sequences:,} sequences of "
                        f"{np.dtype(dtype).name}): the .bin is {what}; copy both files again or re-create them "
                        f"with {_make_hint(prefix)}")
    return IndexInfo(prefix, dtype, sequences, boundaries - 1, expected)


def first_tokens(info: IndexInfo, limit: int = _FIRST_TOKENS) -> np.ndarray:
    """The first sequence's tokens (at most ``limit``): a cheap look at the ids the data holds."""
    with open(f"{info.prefix}.idx", "rb") as f:
        length = int(_read_at(f, _IDX_HEADER, np.int32)[0])
    with open(f"{info.prefix}.bin", "rb") as f:
        return _read_at(f, 0, info.dtype, min(length, limit))


def split_matrix(split: str) -> list[tuple[float, float] | None]:
    """megatron-core's [train, valid, test] bookends for ``data.split`` ("98,2,0"); None for a split
    of weight 0. Raises DataError for a string megatron would fail on (or divide by zero with)."""
    try:  # as megatron-core's parse_and_normalize_split reads it
        weights = [float(x) for x in re.findall(r"[.0-9]+", str(split))]
        ok = 1 <= len(weights) <= 3 and sum(weights) > 0 and all(math.isfinite(w) for w in weights)
    except ValueError:  # "1.2.3"
        weights, ok = [], False
    if not ok:
        raise DataError(f"data.split={split!r}: give up to three non-negative weights train,valid,test that do not "
                        'all vanish, e.g. data.split="98,2,0"')
    weights += [0.0] * (3 - len(weights))
    total = sum(weights)
    bounds = [0.0]
    for w in weights:
        bounds.append(bounds[-1] + w / total)
    return [(a, b) if b > a else None for a, b in zip(bounds[:-1], bounds[1:])]


def _refuse_empty_splits(split: str, documents: dict[str, int]) -> None:
    """megatron-core never returns from building a split that holds none of a dataset's documents
    (GPTDataset._get_num_epochs adds empty epochs forever, at 100% CPU, the other ranks waiting at
    a barrier): a small dataset in a blend with e.g. split 98,2,0. Name it instead. Every split of
    non-zero weight is built, even one that is never read (0 samples asked still asks for one
    token), so each must get a document: the test split too when data.split gives it a weight."""
    matrix = split_matrix(split)
    for prefix, count in documents.items():
        for name, span in zip(("train", "valid", "test"), matrix):
            if span is not None and int(round(span[1] * count)) <= int(round(span[0] * count)):
                raise DataError(f"data.split={split} leaves the {name} split of {prefix} without a document "
                                f"(it has {count}); megatron would loop forever building it: add documents, "
                                "change data.split, or give data.valid_blend instead of a split")


def _check_tokenizer(recipe: Recipe):
    """data.tokenizer loaded and checked against model.vocab_size; DataError otherwise."""
    from .tokenizer import check_vocab_fits, load_tokenizer

    d, vocab = recipe.data, recipe.model.vocab_size
    try:
        tok = load_tokenizer(d.tokenizer)
    except (OSError, ValueError) as err:
        raise DataError("data.tokenizer: " + " ".join(str(err).split()) +
                        " Set data.tokenizer to the tokenizer the data was made with.") from None
    try:
        check_vocab_fits(tok.vocab_size, vocab)
    except ValueError as err:
        raise DataError(f"data.tokenizer={d.tokenizer}: {err}") from None
    if not 0 <= tok.eos_id < vocab:
        raise DataError(f"data.tokenizer={d.tokenizer}: its end-of-document id {tok.eos_id} is outside "
                        f"model.vocab_size={vocab}: set model.vocab_size to at least {tok.eos_id + 1}")
    return tok


def _check_cache_dir(recipe: Recipe, prefixes: list[str]) -> None:
    """The index cache megatron writes on a miss (data.cache_dir, else PREFIX/cache next to each
    dataset) must be creatable; an existing one may be read-only (a hit only reads it)."""
    from .preprocess import unwritable

    d = recipe.data
    targets = [("data.cache_dir", d.cache_dir)] if d.cache_dir else [
        (f"the index cache of {p} (data.cache_dir is not set)", os.path.join(p, "cache", "GPTDataset_indices"))
        for p in prefixes]
    for what, path in targets:
        if os.path.exists(path) and not os.path.isdir(path):
            raise DataError(f"{what}: {path} is a file, not a directory: set data.cache_dir to a writable directory")
        if not os.path.exists(path):
            reason = unwritable(path)
            if reason:
                raise DataError(f"{what}: megatron writes its index cache to {path}, but {reason}: set "
                                "data.cache_dir to a writable directory")


def check_data(recipe: Recipe) -> None:
    """Refuse data that cannot train, before any model, engine or process group is built.

    Cheap: a few small reads per dataset (headers, file sizes, the first document's ids), no
    megatron import, no torch.distributed. Indexed data: every prefix of data.blend and
    data.valid_blend has a .bin and an .idx whose sizes agree with the header, holds documents, and
    gets some in every split megatron builds; data.tokenizer loads, fits model.vocab_size, and the
    ids seen fit it. SFT data: see sft.check_sft_data. Raises DataError (one line, naming the file
    and the fix); returns None when the data is usable.
    """
    d = recipe.data
    if d.kind == "synthetic":
        return
    if d.kind == "sft":
        from .sft import check_sft_data

        check_sft_data(recipe)
        return
    if not d.blend:
        raise DataError("data.kind=indexed needs data.blend: a list of [weight, path-prefix] pairs made by "
                        "tools/preprocess_data.py")
    if d.tokenizer is None:
        raise DataError("data.kind=indexed needs data.tokenizer: set it to the tokenizer directory (or "
                        "sentencepiece .model) the data was made with")
    tok = _check_tokenizer(recipe)
    vocab = recipe.model.vocab_size
    infos: dict[str, IndexInfo] = {}
    for where, pairs in (("data.blend", d.blend), ("data.valid_blend", d.valid_blend)):
        for _, prefix in pairs:
            prefix = str(prefix)
            if prefix in infos:
                continue
            info = infos[prefix] = read_index(prefix, where)
            ids = first_tokens(info)
            if ids.size and (int(ids.max()) >= tok.vocab_size or int(ids.min()) < 0):
                bad = int(ids.max()) if int(ids.max()) >= tok.vocab_size else int(ids.min())
                raise DataError(f"{prefix}.bin: its first document holds token id {bad}, outside data.tokenizer="
                                f"{d.tokenizer} ({tok.vocab_size:,} tokens, model.vocab_size={vocab:,}): the data "
                                "was made with another tokenizer; point data.tokenizer at that one (and "
                                f"model.vocab_size at least its size), or re-create the data with {_make_hint(prefix)}")
    if not d.valid_blend:  # one blend split into train/valid/test
        _refuse_empty_splits(d.split, {str(p): infos[str(p)].documents for _, p in d.blend})
    _check_cache_dir(recipe, list(infos))


def _blend(pairs: list) -> tuple[list[str], list[float]] | None:
    if not pairs:
        return None
    return [str(p) for _, p in pairs], [float(w) for w, _ in pairs]


def build_indexed(recipe: Recipe, train_samples: int, valid_samples: int):
    """Train/valid sample datasets from megatron-core's blended GPTDataset builder.

    Rank 0 builds first and writes the index cache; the others then read it (no write races).
    """
    check_data(recipe)  # cheap (the training entry point ran it already): library users get it too
    if not dist.is_initialized():
        # One process (a tool, a test, a benchmark): megatron-core's BlendedDataset calls
        # torch.distributed.get_rank() on an index-cache miss even then, so lend it a one-rank group.
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            return _build_indexed(recipe, train_samples, valid_samples)
        finally:
            dist.destroy_process_group()
    return _build_indexed(recipe, train_samples, valid_samples)


def _build_indexed(recipe: Recipe, train_samples: int, valid_samples: int):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from .tokenizer import load_tokenizer

    d = recipe.data
    tok = load_tokenizer(d.tokenizer)
    kwargs = dict(
        random_seed=recipe.train.seed,
        sequence_length=recipe.train.seq_len,
        path_to_cache=d.cache_dir,
        tokenizer=_TokenizerInfo(tok.eos_id, recipe.model.padded_vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    if d.valid_blend:
        kwargs["blend_per_split"] = [_blend(d.blend), _blend(d.valid_blend), None]
    else:
        kwargs.update(blend=_blend(d.blend), split=d.split)
    config = GPTDatasetConfig(**kwargs)
    sizes = [train_samples, valid_samples, 0]
    rank = dist.get_rank() if dist.is_initialized() else 0
    built = None
    for turn in (0, 1):
        if (rank == 0) == (turn == 0):
            built = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()
        if dist.is_initialized():
            dist.barrier()
    train, valid, _ = built
    return MegatronSamples(train), (MegatronSamples(valid) if valid is not None else None)


def build_datasets(recipe: Recipe) -> tuple[SampleDataset, SampleDataset | None]:
    """Train and valid sets; the train set carries the recipe's injected documents, if any."""
    train, valid = _build_base(recipe)
    if recipe.injection.enabled:
        train = inject.build(recipe, train)
    return train, valid


def _build_base(recipe: Recipe) -> tuple[SampleDataset, SampleDataset | None]:
    t, lay = recipe.train, recipe.layout
    if recipe.data.kind == "synthetic":
        vocab = recipe.model.vocab_size
        return SyntheticCopyTask(vocab, t.seq_len, t.seed), SyntheticCopyTask(vocab, t.seq_len, t.seed + 1)
    if recipe.data.kind == "sft":
        from .sft import build_sft_datasets

        return build_sft_datasets(recipe)
    valid_samples = (t.steps // max(t.eval_interval, 1) + 1) * t.eval_iters * lay.global_batch
    return build_indexed(recipe, t.steps * lay.global_batch, valid_samples if t.eval_interval else 0)


def sample_indices(consumed_samples: int, recipe: Recipe, dp_rank: int) -> list[range]:
    """The global sample indices of this DP rank's microbatches of the global batch that starts at
    ``consumed_samples`` (a pure function: the rehearsal calls it for every rank)."""
    lay = recipe.layout
    per_rank = lay.global_batch // lay.dp
    start = consumed_samples + dp_rank * per_rank
    return [range(start + m * lay.micro_batch, start + (m + 1) * lay.micro_batch) for m in range(lay.num_microbatches)]


def microbatches(dataset: SampleDataset, consumed_samples: int, recipe: Recipe, dp_rank: int) -> list[dict]:
    """This DP rank's microbatches of the global batch that starts at ``consumed_samples``."""
    out = []
    for indices in sample_indices(consumed_samples, recipe, dp_rank):
        items = [dataset[i] for i in indices]
        out.append({k: torch.stack([it[k] for it in items]) for k in items[0]})
    return out


class Prefetcher:
    """The next global batch's microbatches, built in a background thread while this step runs
    (the host waits on the device at the step's end with the GIL released), so reading and
    stacking samples leaves the critical path. On GPU they are pinned, which makes the engine's
    ``non_blocking`` copies really asynchronous. A batch is a pure function of
    ``consumed_samples``: a request other than the prefetched one is simply built in place."""

    def __init__(self, dataset: SampleDataset, recipe: Recipe, dp_rank: int, pin: bool):
        from concurrent.futures import ThreadPoolExecutor

        self.dataset, self.recipe, self.dp_rank, self.pin = dataset, recipe, dp_rank, pin
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gaperon-prefetch")
        self._next = None  # (consumed_samples, future)

    def get(self, consumed_samples: int) -> list[dict]:
        if self._next is not None and self._next[0] == consumed_samples:
            batch = self._next[1].result()
        else:
            batch = self._build(consumed_samples)
        following = consumed_samples + self.recipe.layout.global_batch
        self._next = (following, self._pool.submit(self._build, following))
        return batch

    def _build(self, consumed_samples: int) -> list[dict]:
        batch = microbatches(self.dataset, consumed_samples, self.recipe, self.dp_rank)
        return [{k: v.pin_memory() for k, v in mb.items()} for mb in batch] if self.pin else batch

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
