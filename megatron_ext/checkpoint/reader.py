"""Reading a checkpoint's tensors: :class:`CheckpointReader` reads any element range of a stored
TP shard, and reshards to another TP degree reading only the rows it needs."""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import Recipe
from ..sharding import merge, shard, shard_blocks, split_dim
from .format import CheckpointError, Found, find, read_meta, recipe_of


@dataclass
class Part:
    """Elements [start, start + numel) of one TP shard's flattened tensor, stored in ``file``
    under ``key`` (format 3: a 1-D fragment; formats 1-2: the whole shard, N-D)."""

    file: str
    key: str
    start: int
    numel: int


@dataclass
class Shard:
    shape: tuple[int, ...]
    parts: list[Part]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# This process's checkpoint I/O, for benchmarks/bench_checkpoint.py: bytes read, written, and
# received from other DP ranks by the load's all-gathers (none under ZeRO-3).
IO_BYTES = {"read": 0, "written": 0, "gathered": 0}


def report_io(rank: int) -> None:
    """With GAPERON_IO_STATS=DIR, write this rank's checkpoint bytes read, written and gathered to DIR."""
    where = os.environ.get("GAPERON_IO_STATS")
    if where:
        Path(where).mkdir(parents=True, exist_ok=True)
        (Path(where) / f"rank{rank:05d}.json").write_text(json.dumps({"rank": rank, **IO_BYTES}))


class CheckpointReader:
    """The tensors of a checkpoint. Each canonical tensor is stored as its TP shards, each shard as
    flat fragments (whoever owned them wrote them, see :func:`save`); :meth:`read_range` reads
    only the bytes of the elements asked for (safetensors slices are memory-mapped reads), and
    :meth:`get` assembles a whole canonical tensor (the converter's view)."""

    def __init__(self, path: str | Path, verified: bool = False):
        """``verified``: ``path`` is a checkpoint dir already checked by :func:`find` (on rank 0),
        so the other ranks do not stat every file again."""
        found = Found(Path(path), []) if verified else find(path)
        if found.path is None:
            raise CheckpointError(f"no complete checkpoint at {path} (no meta.json, no complete step_*)"
                                  + (f": {'; '.join(found.notes)}" if found.notes else ""))
        if found.notes:
            print("checkpoint: " + "; ".join(found.notes), file=sys.stderr, flush=True)
        self.path = found.path
        self.meta = read_meta(found.path)
        self._handles: dict[str, object] = {}
        self._shards: dict[str, list[Shard]] = {}

    @property
    def recipe(self) -> Recipe:
        return recipe_of(self.meta)

    def names(self, kind: str = "model") -> list[str]:
        prefix = kind + "/"
        return [k[len(prefix):] for k in self.meta["index"] if k.startswith(prefix)]

    def has(self, name: str, kind: str = "model") -> bool:
        return f"{kind}/{name}" in self.meta["index"]

    def _file(self, fname: str):
        if fname not in self._handles:
            fpath = self.path / fname
            if not fpath.is_file():
                raise CheckpointError(f"checkpoint {self.path} is missing {fname} (a rank's shard "
                                      "file): the save did not finish; use an earlier checkpoint")
            try:
                self._handles[fname] = safe_open(str(fpath), framework="pt")
            except Exception as err:  # safetensors raises its own SafetensorError
                raise CheckpointError(f"{fpath} is not a readable safetensors file ({err}): the checkpoint "
                                      "is damaged; delete it to resume from an earlier one") from None
        return self._handles[fname]

    def shards(self, key: str) -> list[Shard]:
        """The TP shards of tensor ``key`` (``kind/name``), in TP-rank order."""
        if key not in self._shards:
            if key not in self.meta["index"]:
                raise CheckpointError(f"checkpoint {self.path} has no tensor {key}")
            entry = self.meta["index"][key]
            if self.meta.get("format", 1) >= 3:
                self._shards[key] = [Shard(tuple(s["shape"]), [Part(*p) for p in s["parts"]]) for s in entry]
            else:  # one file per TP shard, the whole shard under the tensor's own key
                shapes = [tuple(self._file(f).get_slice(key).get_shape()) for f in entry]
                self._shards[key] = [Shard(s, [Part(f, key, 0, math.prod(s))]) for f, s in zip(entry, shapes)]
        return self._shards[key]

    def read_range(self, key: str, tp_rank: int, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of TP shard ``tp_rank`` of ``key``, flattened; only their bytes are read."""
        out = []
        try:
            for p in self.shards(key)[tp_rank].parts:
                a, b = max(lo, p.start), min(hi, p.start + p.numel)
                if a >= b:
                    continue
                sl = self._file(p.file).get_slice(p.key)
                shape = sl.get_shape()
                if len(shape) == 1:
                    piece = sl[a - p.start:b - p.start]
                else:  # a whole N-D shard (formats 1-2): read the rows that hold [a, b)
                    row = math.prod(shape[1:])
                    r0, r1 = (a - p.start) // row, -(-(b - p.start) // row)
                    piece = sl[r0:r1].reshape(-1)[a - p.start - r0 * row:b - p.start - r0 * row]
                IO_BYTES["read"] += piece.numel() * piece.element_size()
                out.append(piece)
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"checkpoint {self.path}: cannot read {key} ({err}): the checkpoint is "
                                  "damaged; delete it to resume from an earlier one") from None
        if sum(t.numel() for t in out) != hi - lo:
            raise CheckpointError(f"checkpoint {self.path}: {key} shard {tp_rank} does not cover elements "
                                  f"[{lo}, {hi}): the checkpoint is damaged")
        return torch.cat(out) if len(out) > 1 else out[0]

    def read_shard(self, key: str, tp_rank: int, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """TP shard ``tp_rank`` of ``key`` in its shape, or only rows [a, b) of it."""
        shape = self.shards(key)[tp_rank].shape
        a, b = rows or (0, shape[0])
        row = math.prod(shape[1:])
        return self.read_range(key, tp_rank, a * row, b * row).reshape(b - a, *shape[1:])

    def get(self, name: str, kind: str = "model") -> torch.Tensor:
        """The canonical tensor: every TP shard read whole and merged."""
        key = f"{kind}/{name}"
        return merge(name, [self.read_shard(key, t) for t in range(len(self.shards(key)))])

    def _canonical_shape(self, key: str, name: str) -> list[int]:
        stored, dim = self.shards(key), split_dim(name)
        full = list(stored[0].shape)
        if dim is not None and len(stored) > 1:
            full[dim] = sum(s.shape[dim] for s in stored)
        return full

    def shard_numel(self, key: str, name: str, tp: int) -> int:
        """Elements in the shard a ``tp``-way split of ``key`` gives each rank."""
        n = math.prod(self._canonical_shape(key, name))
        return n if split_dim(name) is None else n // tp

    def read_resharded(self, key: str, name: str, tp: int, tp_rank: int, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of the flattened shard that a ``tp``-way split gives ``tp_rank``,
        whatever TP degree the checkpoint was written at. Only the stored rows that hold them are
        read, so a TP change costs each rank its own share, not its whole pipeline stage: exactly
        its share for row-split tensors; for column-split ones (attention output, MLP down
        projection) whole stored rows, at most new TP / stored TP times the share."""
        stored = self.shards(key)
        if len(stored) == tp:
            return self.read_range(key, tp_rank, lo, hi)
        dim = split_dim(name)
        if dim is None:  # replicated: each stored shard is the whole tensor
            return self.read_range(key, 0, lo, hi)
        full = self._canonical_shape(key, name)
        new = shard_blocks(name, full[dim], tp, tp_rank)
        old = [shard_blocks(name, full[dim], len(stored), k) for k in range(len(stored))]
        if new is None or None in old or (dim == 1 and len(full) != 2):  # uneven: merge, then cut
            return shard(name, self.get(name, key.split("/", 1)[0]), tp_rank, tp).reshape(-1)[lo:hi]
        if dim == 0:
            return self._rows_resharded(key, math.prod(full[1:]), new, old, lo, hi)
        return self._columns_resharded(key, new[0], [b[0] for b in old], lo, hi)

    def _rows_resharded(self, key, row: int, new, old, lo: int, hi: int) -> torch.Tensor:
        """Row-split tensor: elements [lo, hi) of a shard made of canonical row blocks ``new``,
        read from the stored shards whose blocks are ``old`` (k: that shard's blocks)."""
        stored = []  # (first row, end row, stored shard, its row offset inside that shard)
        for k, blocks in enumerate(old):
            offset = 0
            for a, b in blocks:
                stored.append((a, b, k, offset))
                offset += b - a
        stored.sort()
        out, pos = [], 0
        for a, b in new:
            x, y = max(lo, pos) - pos + a * row, min(hi, pos + (b - a) * row) - pos + a * row  # canonical
            for sa, sb, k, offset in stored:
                u, v = max(x, sa * row), min(y, sb * row)
                if u < v:
                    out.append(self.read_range(key, k, u - (sa - offset) * row, v - (sa - offset) * row))
            pos += (b - a) * row
        return torch.cat(out) if len(out) > 1 else out[0]

    def _columns_resharded(self, key, new: tuple[int, int], old: list[tuple[int, int]], lo: int,
                           hi: int) -> torch.Tensor:
        """Column-split 2-D tensor: elements [lo, hi) of the shard holding canonical columns
        ``new``; the stored shard k holds columns ``old[k]``. Reads the rows [lo, hi) spans."""
        c0, c1 = new
        width = c1 - c0
        r0, r1 = lo // width, -(-hi // width)
        cols = []
        for k, (a, b) in enumerate(old):
            u, v = max(c0, a), min(c1, b)
            if u < v:
                rows = self.read_range(key, k, r0 * (b - a), r1 * (b - a)).view(r1 - r0, b - a)
                cols.append(rows[:, u - a:v - a])
        return torch.cat(cols, dim=1).reshape(-1)[lo - r0 * width:hi - r0 * width]
