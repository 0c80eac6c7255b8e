"""Controlled document injection, for memorisation and poisoning research.

Gaperon put harmless trigger documents into ~0.01-0.02% of its mix. This module does the same,
reproducibly: the plan (which global sample index holds which document) is a pure function of the
recipe (``injection.*``, ``train.steps``, ``layout.global_batch``), so every rank, every restart
and every layout sees the same one, and every other sample is exactly what the run would read
without injection. Documents go round-robin, so each appears a known number of times.

An injected sample holds one document: its tokens + EOS, then EOS padding that carries no loss.
One injection is therefore exactly one occurrence (repeating the document to fill the sequence
would blur the counts). A document longer than ``train.seq_len + 1`` tokens is refused, not cut:
a cut canary is a different canary.

Before the first step :func:`write_record` puts one line per injection in
``<output_dir>/injections.jsonl`` (sample index, step, data-parallel rank, microbatch, row,
document, sha256 of its token ids); a restart whose plan differs from that record is refused.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from .errors import GaperonError
from .config import InjectionConfig, Recipe

# The fields that define the plan; the others (step, rank, microbatch) depend on the layout.
PLAN_KEYS = ("sample", "document", "sha256")


class InjectionError(GaperonError, RuntimeError):
    """The injection cannot run as asked. The message says what to change."""


def make_plan(cfg: InjectionConfig, total_samples: int, num_docs: int) -> dict[int, int]:
    """Global sample index -> document id. Explicit positions take documents round-robin in the
    order listed; a rate draws ``cfg.count`` distinct positions in the window with ``cfg.seed`` and
    deals the documents round-robin in shuffled order (document k appears count // n times, plus
    one if k < count % n)."""
    if cfg.positions:
        return {int(p): k % num_docs for k, p in enumerate(cfg.positions)}
    start, end = cfg.window(total_samples)
    count = cfg.count(total_samples)
    rng = np.random.default_rng(cfg.seed)
    positions = np.sort(rng.choice(end - start, size=count, replace=False)) + start
    docs = rng.permutation(np.arange(count) % num_docs)
    return dict(zip(positions.tolist(), docs.tolist()))


def _tokenizer(recipe: Recipe):
    from .tokenizer import load_tokenizer

    path = recipe.data.tokenizer
    if path is None and recipe.data.kind == "sft":
        path = json.loads((Path(recipe.data.sft_path) / "meta.json").read_text())["tokenizer"]
    if path is None:
        raise InjectionError("injection documents need the run's tokenizer: set data.tokenizer")
    return load_tokenizer(path)


def check_documents(recipe: Recipe) -> None:
    """Before any process group (launch.py): an enabled injection's ``documents`` file exists, is
    readable UTF-8 and holds a JSON object with "text" on every non-blank line (InjectionError)."""
    inj = recipe.injection
    if inj.enabled and inj.documents and not inj.texts and not inj.token_ids:
        if not _read_texts(inj.documents):
            raise InjectionError(f"injection.documents: {inj.documents} holds no document: add JSONL lines "
                                 '{"text": ...} or set injection.enabled=false')


def _read_texts(path: str) -> list[str]:
    texts = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InjectionError(f"injection.documents: {path} does not exist: point it at a JSONL file of "
                             '{"text": ...} lines') from None
    except UnicodeDecodeError as err:
        raise InjectionError(f"injection.documents: {path} is not UTF-8 text (byte {err.start}): point it at a "
                             "JSONL file") from None
    except OSError as err:
        raise InjectionError(f"injection.documents: cannot read {path} ({err.strerror or err}): fix its "
                             "permissions or the path") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            texts.append(json.loads(line)["text"])
        except (ValueError, KeyError, TypeError):
            raise InjectionError(f"{path}:{n}: expected a JSON object with a \"text\" key") from None
    return texts


def load_documents(recipe: Recipe) -> tuple[list[list[int]], int]:
    """Each document's token ids, EOS included, and the EOS id. Synthetic data has no tokenizer:
    its documents are token_ids and its EOS is 0, an id the copy task never produces."""
    inj = recipe.injection
    if inj.token_ids:
        eos = 0 if recipe.data.kind == "synthetic" else _tokenizer(recipe).eos_id
        return [list(ids) + [eos] for ids in inj.token_ids], eos
    texts = inj.texts or _read_texts(inj.documents)
    tok = _tokenizer(recipe)
    return [tok.encode(text) + [tok.eos_id] for text in texts], tok.eos_id


def document_sample(ids: list[int], seq_len: int, pad: int, segmented: bool) -> dict[str, torch.Tensor]:
    """One document then padding, shifted into tokens/labels like every other sample."""
    seq = np.full(seq_len + 1, pad, dtype=np.int64)
    seq[: len(ids)] = ids
    loss_mask = np.zeros(seq_len, dtype=np.float32)
    loss_mask[: len(ids) - 1] = 1.0
    out = {"tokens": torch.from_numpy(seq[:-1].copy()), "labels": torch.from_numpy(seq[1:].copy()),
           "loss_mask": torch.from_numpy(loss_mask)}
    if segmented:  # packed SFT: the padding is a segment of its own, as in sft.py
        segment = np.ones(seq_len, dtype=np.int64)
        segment[: len(ids) - 1] = 0
        out["segment_ids"] = torch.from_numpy(segment)
    return out


class InjectedDataset:
    """``base`` with the planned indices replaced by their documents; every other index is
    ``base[index]`` untouched."""

    def __init__(self, base, plan: dict[int, int], docs: list[list[int]], seq_len: int, pad: int):
        self.base, self.plan, self.docs = base, plan, docs
        segmented = "segment_ids" in base[0]
        self.samples = [document_sample(ids, seq_len, pad, segmented) for ids in docs]
        self.sha256 = [hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest() for ids in docs]

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        doc = self.plan.get(index)
        if doc is None:
            return self.base[index]
        return {k: v.clone() for k, v in self.samples[doc].items()}


def build(recipe: Recipe, base) -> InjectedDataset:
    """Wrap the training set with the recipe's injection plan."""
    inj, t = recipe.injection, recipe.train
    docs, eos = load_documents(recipe)
    for k, ids in enumerate(docs):
        if len(ids) < 2:
            raise InjectionError(f"injection document {k} is empty: remove it")
        if len(ids) > t.seq_len + 1:
            raise InjectionError(f"injection document {k} is {len(ids)} tokens with EOS, more than "
                                 f"train.seq_len + 1 = {t.seq_len + 1}: shorten it or raise train.seq_len")
    total = t.steps * recipe.layout.global_batch
    if inj.count(total) < len(docs):
        raise InjectionError(f"the plan has {inj.count(total)} injections for {len(docs)} documents, so some "
                             "would never be inserted: raise injection.rate, add positions or drop documents")
    return InjectedDataset(base, make_plan(inj, total, len(docs)), docs, t.seq_len, eos)


def records(dataset: InjectedDataset, recipe: Recipe, step: int = 0, consumed_samples: int = 0) -> list[dict]:
    """Where each injection lands when training continues from (step, consumed_samples): a step
    reads the next global batch, split into dp ranks, then microbatches, as data.microbatches."""
    lay = recipe.layout
    per_rank = lay.global_batch // lay.dp
    out = []
    for index in sorted(dataset.plan):
        doc = dataset.plan[index]
        batch, offset = divmod(index - consumed_samples, lay.global_batch)
        rank, slot = divmod(offset, per_rank)
        out.append({"sample": index, "step": step + batch + 1, "dp_rank": rank,
                    "microbatch": slot // lay.micro_batch, "row": slot % lay.micro_batch,
                    "document": doc, "tokens": len(dataset.docs[doc]), "sha256": dataset.sha256[doc]})
    return out


def _read_record(path: Path) -> list[dict] | None:
    if not path.is_file():
        return None
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except ValueError:
        raise InjectionError(f"{path} is not valid JSONL: restore it from a backup, or use a new "
                             "train.output_dir") from None


def write_record(train_data, recipe: Recipe, state, write: bool) -> None:
    """Record where every injection goes, before the first step, and refuse a restart that would
    change the plan. ``state`` is where training continues (a TrainState); lines for samples
    already trained keep the placement they had. Called on every rank so that all refuse
    together; only ``write`` (rank 0) writes, atomically (tmp + rename)."""
    path = Path(recipe.train.output_dir) / recipe.injection.record
    old = _read_record(path)
    if not isinstance(train_data, InjectedDataset):
        if old is not None:
            raise InjectionError(f"{path} records an injection plan, but injection is now disabled: "
                                 "re-enable it with the same settings, or use a new train.output_dir")
        return
    new = records(train_data, recipe, state.step, state.consumed_samples)
    done = state.consumed_samples
    if old is None:
        trained = sum(r["sample"] < done for r in new)
        if trained:
            raise InjectionError(
                f"this run already trained {done} samples without an injection record ({path} is "
                f"missing), and the plan puts {trained} injections among them: use a new train.output_dir, "
                f"or set injection.start_sample >= {done}")
    else:
        def plan(rows):
            return [{k: r.get(k) for k in PLAN_KEYS} for r in rows]

        if plan(old) != plan(new):
            raise InjectionError(
                f"the injection plan differs from the one recorded in {path}: restore the settings the "
                "run started with (injection.*, train.steps, layout.global_batch, the documents), or "
                "use a new train.output_dir")
        new = [o if o["sample"] < done else n for o, n in zip(old, new)]
        if new == old:
            return
    if write:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in new)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
