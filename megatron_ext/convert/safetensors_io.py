"""Streaming safetensors: files written header first and tensor by tensor (or block of rows by block),
sharding plans, reading an HF directory's tensors one at a time, and the staging directory every
output goes through."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import sys
from pathlib import Path

import torch

from .names import ConvertError, _nbytes


_ST_CODE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_ST_DTYPE = {v: k for k, v in _ST_CODE.items()}


@contextlib.contextmanager
def _all_written(writers: dict):
    """Close every writer of ``writers`` still open when the block ends; abort them all (no
    partial file left behind) if it raises."""
    try:
        yield writers
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise


class StreamingSafetensorsWriter:
    """A safetensors file whose tensors (names, dtypes, shapes) are known before their data.

    The header is written first; :meth:`append` then adds each tensor's data in the planned order,
    whole or in blocks of leading rows, so no more than the block being appended is ever in memory.
    The result is an ordinary safetensors file (8-byte header length, JSON header padded to 8
    bytes, little-endian data with contiguous offsets)."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, fsync: bool = True):
        if sys.byteorder != "little":  # pragma: no cover - every supported machine is little-endian
            raise ConvertError("safetensors is little-endian; this machine is not")
        self.path, self.fsync = Path(path), fsync
        self.entries = [(n, dt, tuple(int(x) for x in s)) for n, dt, s in entries]
        header: dict = {"__metadata__": metadata} if metadata else {}
        offset = 0
        for n, dt, s in self.entries:
            size = _nbytes(dt, s)
            header[n] = {"dtype": _ST_CODE[dt], "shape": list(s), "data_offsets": [offset, offset + size]}
            offset += size
        self.total_bytes = offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(raw)))
        self._f.write(raw)
        self._i, self._rows_done = 0, 0

    def append(self, name: str, block: torch.Tensor) -> None:
        if self._i >= len(self.entries):
            raise ConvertError(f"{self.path.name}: unexpected extra tensor {name}")
        want, dt, shape = self.entries[self._i]
        if name != want:
            raise ConvertError(f"{self.path.name}: got {name} where {want} was planned")
        if block.dtype != dt:
            block = block.to(dt)
        rows = block.shape[0] if block.dim() else 1
        if tuple(block.shape[1:]) != shape[1:] or self._rows_done + rows > (shape[0] if shape else 1):
            raise ConvertError(f"{name}: got a tensor of shape {tuple(block.shape)} (after "
                               f"{self._rows_done} rows) for a planned shape {shape}")
        data = block.contiguous().reshape(-1).view(torch.uint8).numpy()
        self._f.write(memoryview(data))
        self._rows_done += rows
        if self._rows_done == (shape[0] if shape else 1):
            self._i, self._rows_done = self._i + 1, 0

    def close(self) -> None:
        if self._i != len(self.entries):
            missing = self.entries[self._i][0]
            self._f.close()
            raise ConvertError(f"{self.path.name}: incomplete, {missing} was never written")
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()


def plan_shards(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], max_bytes: int) -> list[list]:
    """Greedy, in order: a new shard starts when the next tensor would overflow the current one
    (a tensor bigger than ``max_bytes`` gets a shard of its own)."""
    shards, cur, size = [], [], 0
    for e in entries:
        n = _nbytes(e[1], e[2])
        if cur and size + n > max_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += n
    if cur:
        shards.append(cur)
    return shards


def _open_st(path: Path):
    """A safetensors handle for a ``with`` block. Its tensors are views of a memory map, and mapped
    pages count as resident memory while the handle is open, so handles live for one tensor (the
    CheckpointReader keeps its handles for its lifetime)."""
    from safetensors import safe_open

    return safe_open(str(path), framework="pt")


def _st_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    with _open_st(path) as h:
        return {k: (tuple(h.get_slice(k).get_shape()), h.get_slice(k).get_dtype()) for k in h.keys()}


class _Staging:
    """Write into ``out/.convert-tmp-<pid>`` and move the files into ``out`` only at the end.

    ``out`` may not exist, may be empty, or (with ``overwrite``) may hold anything: only the files
    this conversion writes are replaced; nothing else of the user's is ever removed."""

    def __init__(self, out: str | Path, overwrite: bool, conflicts: tuple[str, ...] = ()):
        self.out = Path(out)
        self.overwrite, self.conflicts = overwrite, conflicts
        self.created = False

    def __enter__(self) -> "_Staging":
        out = self.out
        if out.exists() and not out.is_dir():
            raise ConvertError(f"output {out} exists and is not a directory")
        if out.is_dir():
            existing = [p.name for p in out.iterdir() if not p.name.startswith(".convert-tmp-")]
            if existing and not self.overwrite:
                shown = ", ".join(sorted(existing)[:5]) + (", ..." if len(existing) > 5 else "")
                raise ConvertError(f"output directory {out} is not empty ({shown}): choose a new "
                                   "directory, or pass --overwrite to replace the files this conversion "
                                   "writes (nothing else there is touched)")
            clash = [c for c in self.conflicts if (out / c).exists()]
            if clash:
                raise ConvertError(f"output directory {out} holds {', '.join(clash)}, which loaders would "
                                   "read instead of (or mix with) the new files; remove it yourself or "
                                   "choose another directory")
        else:
            out.mkdir(parents=True)
            self.created = True
        self.tmp = out / f".convert-tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self

    def commit(self, names: list[str]) -> None:
        """Move staged files into place, in this order (the completeness marker last)."""
        for n in names:
            os.replace(self.tmp / n, self.out / n)
        shutil.rmtree(self.tmp, ignore_errors=True)
        fd = os.open(self.out, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            return
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.created and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()


class _HFFiles:
    """Tensors of an HF directory (sharded with an index, or one model.safetensors), opened per read."""

    def __init__(self, hf_dir: str | Path):
        d = Path(hf_dir)
        self.dir = d
        index = d / "model.safetensors.index.json"
        if index.is_file():
            self.where = json.loads(index.read_text())["weight_map"]
        elif (d / "model.safetensors").is_file():
            self.where = {k: "model.safetensors" for k in _st_shapes(d / "model.safetensors")}
        elif any(d.glob("pytorch_model*.bin")):
            raise ConvertError(f"{d} holds PyTorch .bin weights; only safetensors convert. Re-save it with "
                               "save_pretrained(..., safe_serialization=True) first")
        else:
            raise ConvertError(f"{d} has no model.safetensors or model.safetensors.index.json: not a "
                               "Hugging Face model directory")
        for f in sorted(set(self.where.values())):
            if not (d / f).is_file():
                raise ConvertError(f"{d} is missing {f}, a shard its model.safetensors.index.json lists")
        self._shapes: dict[str, tuple] | None = None

    def shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        if self._shapes is None:
            self._shapes = {}
            for f in sorted(set(self.where.values())):
                self._shapes.update(_st_shapes(self.dir / f))
        return self._shapes

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if name not in self.where:
            raise ConvertError(f"{self.dir} has no tensor {name}")
        with _open_st(self.dir / self.where[name]) as h:
            return h.get_tensor(name) if rows is None else h.get_slice(name)[rows[0]:rows[1]]

    def dtype(self, name: str) -> torch.dtype:
        code = self.shapes()[name][1]
        if code not in _ST_DTYPE:
            raise ConvertError(f"{self.dir}: {name} has unsupported dtype {code}")
        return _ST_DTYPE[code]
