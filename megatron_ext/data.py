"""Training samples: where they come from and which rank sees which.

A dataset maps a global sample index to ``{"tokens", "labels", "loss_mask"}`` (each [seq_len]).
Which indices a rank reads is a pure function of (consumed samples, data-parallel rank): every
rank of one tensor/pipeline group reads the same samples, and resuming from a checkpoint's
consumed-samples count continues with exactly the next sample.
"""
from __future__ import annotations

import struct
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist

from . import inject
from .config import Recipe


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


def _refuse_empty_splits(config) -> None:
    """megatron-core never returns from building a split that holds none of a dataset's documents
    (GPTDataset._get_num_epochs adds empty epochs forever, at 100% CPU, the other ranks waiting at
    a barrier): a small dataset in a blend with e.g. split 98,2,0. Name it instead."""
    if config.blend is None:
        return
    for prefix in config.blend[0]:
        try:
            with open(f"{prefix}.idx", "rb") as f:  # header: magic (9), version (8), dtype (1), sequence count (8)
                count = struct.unpack("<Q", f.read(26)[18:26])[0]
        except (OSError, struct.error):
            continue  # missing or short: megatron's own check reports it
        for name, span in zip(("train", "valid", "test"), config.split_matrix):
            if span is not None and int(round(span[1] * count)) <= int(round(span[0] * count)):
                raise ValueError(f"data.split={config.split} leaves the {name} split of {prefix} without a document "
                                 f"(it has {count}); megatron would loop forever building it: add documents, "
                                 "change data.split, or give data.valid_blend instead of a split")


def _blend(pairs: list) -> tuple[list[str], list[float]] | None:
    if not pairs:
        return None
    return [str(p) for _, p in pairs], [float(w) for w, _ in pairs]


def build_indexed(recipe: Recipe, train_samples: int, valid_samples: int):
    """Train/valid sample datasets from megatron-core's blended GPTDataset builder.

    Rank 0 builds first and writes the index cache; the others then read it (no write races).
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from .tokenizer import load_tokenizer

    if not dist.is_initialized():
        # One process (a tool, a test, a benchmark): megatron-core's BlendedDataset calls
        # torch.distributed.get_rank() on an index-cache miss even then, so lend it a one-rank group.
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        try:
            return build_indexed(recipe, train_samples, valid_samples)
        finally:
            dist.destroy_process_group()
    d = recipe.data
    if d.tokenizer is None:
        raise ValueError("data.tokenizer must name the tokenizer directory the data was made with")
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
    _refuse_empty_splits(config)
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


def microbatches(dataset: SampleDataset, consumed_samples: int, recipe: Recipe, dp_rank: int) -> list[dict]:
    """This DP rank's microbatches of the global batch that starts at ``consumed_samples``."""
    lay = recipe.layout
    per_rank = lay.global_batch // lay.dp
    start = consumed_samples + dp_rank * per_rank
    out = []
    for m in range(lay.num_microbatches):
        items = [dataset[start + m * lay.micro_batch + j] for j in range(lay.micro_batch)]
        out.append({k: torch.stack([it[k] for it in items]) for k in items[0]})
    return out
