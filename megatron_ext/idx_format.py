"""Megatron-Core's indexed-dataset .idx header: written by preprocessing, read by the data checks.

Layout: magic, version <Q, dtype code <B, sequence count <Q, document-boundary count <Q; then
int32 lengths [sequences], int64 byte pointers into the .bin [sequences], int64 document
boundaries [boundaries] (0, ..., sequences). The one place that knows it.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_FIELDS = struct.Struct("<QBQQ")
HEADER_BYTES = len(MAGIC) + _FIELDS.size  # 34
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
          8: np.uint16}


class Header(NamedTuple):
    version: int
    code: int  # a key of DTYPES
    sequences: int
    boundaries: int  # documents + 1

    def index_bytes(self) -> int:
        """The size of an .idx with this header."""
        return HEADER_BYTES + 12 * self.sequences + 8 * self.boundaries


def parse(head: bytes) -> Header | None:
    """The header in the first HEADER_BYTES of an .idx; None when they are not one (short, bad magic)."""
    if len(head) < HEADER_BYTES or head[:len(MAGIC)] != MAGIC:
        return None
    return Header(*_FIELDS.unpack(head[len(MAGIC):HEADER_BYTES]))


def pack(code: int, sequences: int, boundaries: int) -> bytes:
    return MAGIC + _FIELDS.pack(VERSION, code, sequences, boundaries)
