"""Reading our checkpoints for conversion: the tensors a recipe's model needs, checked, then read TP
shard by shard (vocab matrices by blocks of rows) straight into the output dtype."""
from __future__ import annotations

from typing import Iterator

import torch

from ..config import ModelConfig
from ..sharding import merge_into, split_dim, te_name
from .names import ConvertError, _describe, canonical_shapes, shard_shape


ROW_BLOCK_BYTES = 64 * 2**20  # vocab matrices are moved in blocks of about this many bytes


def _reader(path):
    from ..checkpoint import CheckpointReader

    return CheckpointReader(path)


def check_checkpoint(reader, m: ModelConfig) -> dict[str, str]:
    """Every tensor the recipe's model needs is in the checkpoint with the right shape, and nothing
    else is. Returns canonical local-spec name -> the name stored (local or TE spec)."""
    stored = set(reader.names("model"))
    want = canonical_shapes(m)
    where: dict[str, str] = {}
    for n in want:
        alias = te_name(n)
        if n in stored:
            where[n] = n
        elif alias in stored:
            where[n] = alias
        else:
            raise ConvertError(f"checkpoint {reader.path} has no tensor model/{n}, which its recipe's model "
                               f"({_describe(m)}) needs: the checkpoint and its recipe disagree")
    extra = sorted(stored - set(where.values()))
    if extra:
        raise ConvertError(f"checkpoint {reader.path} has tensors its recipe's model ({_describe(m)}) does "
                           f"not: {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}; the recipe in "
                           "meta.json does not describe these weights")
    for n, src in where.items():
        shards = reader.shards(f"model/{src}")
        tp = len(shards)
        expect = shard_shape(n, want[n], tp)
        for r, sh in enumerate(shards):
            if sh.shape != expect:
                raise ConvertError(
                    f"model/{src}: tensor-parallel shard {r} of {tp} has shape {sh.shape}, but the "
                    f"recipe's model ({_describe(m)}) needs {expect} (full {want[n]}): the checkpoint "
                    "was not written by this recipe's model")
    return where


def _rows_block(h: int, itemsize: int = 4) -> int:
    return max(1, ROW_BLOCK_BYTES // (h * itemsize))


def iter_ckpt_rows(reader, src: str, stop: int, kind: str = "model") -> Iterator[torch.Tensor]:
    """Rows [0, stop) of a row-split canonical tensor (the vocab matrices), in blocks, read from
    each TP shard in turn (only the block's bytes are read)."""
    key, row = f"{kind}/{src}", 0
    for r, sh in enumerate(reader.shards(key)):
        n, width = sh.shape[:2]
        block = _rows_block(width)
        for a in range(0, n, block):
            b = min(a + block, n, a + stop - row)
            if b <= a:
                break
            yield reader.read_shard(key, r, rows=(a, b))
            row += b - a
        if row >= stop:
            return


def read_merged(reader, src: str, dtype: torch.dtype, kind: str = "model") -> torch.Tensor:
    """The canonical tensor ``src`` (TP-merged, as ``CheckpointReader.get``) in ``dtype``, one TP
    shard at a time into the output (no merged fp32 copy first)."""
    key = f"{kind}/{src}"
    shards = reader.shards(key)
    tp, dim = len(shards), split_dim(src)
    out = None
    for r in range(tp if dim is not None else 1):
        part = reader.read_shard(key, r)
        if out is None:
            shape = list(part.shape)
            if dim is not None:
                shape[dim] *= tp
            out = torch.empty(shape, dtype=dtype)
        merge_into(src, out, part, r, tp)
        del part
    return out


def read_ckpt_rows(reader, src: str, stop: int) -> torch.Tensor:
    return torch.cat(list(iter_ckpt_rows(reader, src, stop)))
