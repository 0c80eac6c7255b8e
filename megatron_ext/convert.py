"""Our layout-free checkpoints <-> Hugging Face directories (Llama, Qwen3, OLMo-2), streamed, and checked.

Three jobs, one CLI each (``tools/convert_checkpoint.py``):

* :func:`to_hf` — a training checkpoint written at any TP/PP/DP/ZeRO layout (checkpoint.py's
  format) -> an HF directory of its family (``LlamaForCausalLM``, ``Qwen3ForCausalLM`` or
  ``Olmo2ForCausalLM``): safetensors shards + ``model.safetensors.index.json``,
  ``config.json``, ``generation_config.json`` and the tokenizer files. Ends with :func:`verify` on a
  slice of the model unless told not to.
* :func:`from_hf` — the reverse: an HF directory -> a checkpoint directory in our format
  (step 0, weights only) that ``checkpoint.init_from=<dir>`` starts a phase from, plus a
  ``recipe.yaml`` beside it that SFT / continued-pretraining recipes can take as ``base:``.
* :func:`verify` — build the Megatron model (tp=pp=dp=1, fp32, CPU) from a checkpoint and the HF
  model from a directory, run both on fixed random sequences and compare logits.

Mapping: each Hugging Face family (``LlamaForCausalLM``; ``Qwen3ForCausalLM`` for Llama blocks with
per-head QK-norm, ``model.qk_layernorm``; ``Olmo2ForCausalLM`` for ``model.block: olmo2``) is a table
of rules in hf_families.py, one rule per tensor (hf_mapping.py: fused QKV, gated MLP, norms,
row/column-parallel, vocab matrices whose padding rows are cut). Megatron's rotary embedding
(non-interleaved) is HF's ``rotate_half`` convention, so q/k rows need no permutation;
:func:`verify` checks that on every export. ``model.rope_scaling`` (Llama-3.1's llama3 scaling)
is config.json's ``rope_scaling`` / ``rope_parameters`` with ``rope_type: llama3``; other rope
types are refused.

Streaming: both directions plan every output file (names, dtypes, shapes) from the recipe before
reading a byte, then read one layer at a time and append each tensor to its file as it is made
(:class:`StreamingSafetensorsWriter` writes the header first, then the data in order). The
vocabulary matrices, the largest tensors, are moved in blocks of rows straight from each TP shard
file. Peak memory is about one layer, whatever ``--shard-size`` is; nothing holds a whole shard.

Output directories are written through a staging directory inside them and moved into place at
the end, so a failed conversion leaves nothing half-written, and only the files we write are ever
replaced (with ``overwrite``); nothing else in the directory is touched.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from .checkpoint.format import build_meta, norm_gain_scale
from .errors import EXIT_FAILED, GaperonError, free_port, parse_size as _parse_size
from .config import ModelConfig, Recipe, RecipeError, recipe_from_tree
from .hf_families import FAMILIES
from .hf_mapping import Family, Rule
from .sharding import LAYER_RE, is_norm_gain, local_name, shard, split_dim, te_name

# --------------------------------------------------------------------------------------------
# errors, sizes, dtypes


class ConvertError(GaperonError, ValueError):
    """Input that cannot be converted. The message says what is wrong and what to do."""


class VerifyError(GaperonError, RuntimeError):
    """The converted model does not compute what the checkpoint computes."""

    exit_code = EXIT_FAILED


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
_ST_CODE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_ST_DTYPE = {v: k for k, v in _ST_CODE.items()}
_HF_DTYPE_NAME = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
ROW_BLOCK_BYTES = 64 * 2**20  # vocab matrices are moved in blocks of about this many bytes
VERIFY_VOCAB_ROWS = 4096  # logits compared on this many vocab rows by the post-export check


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (HF's convention: GB = 10^9); '500MiB', '1e9' and ints work too."""
    try:
        return _parse_size(text)
    except ValueError as err:
        raise ConvertError(f"--shard-size: {err}") from None

def _nbytes(dtype: torch.dtype, shape) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------
# names and shapes

EMBED, FINAL_NORM, OUTPUT = "embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"
VOCAB_TENSORS = (EMBED, OUTPUT)


def _layer(i: int, suffix: str) -> str:
    return f"decoder.layers.{i}.{suffix}"


def family_of(m: ModelConfig) -> Family:
    """The transformers family that holds exactly this model."""
    for fam in FAMILIES:
        if fam.holds(m):
            return fam
    raise ConvertError(f"no Hugging Face architecture holds model.block={m.block} with "
                       f"model.qk_layernorm={m.qk_layernorm}")


def layer_suffixes(m: ModelConfig) -> list[str]:
    """Local-spec parameter names of one layer, in conversion order."""
    return [r.megatron for r in family_of(m).layer]


def canonical_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical (local-spec) tensor a model of this shape has, in conversion order."""
    h, d, f, vp = m.hidden_size, m.kv_channels, m.ffn_hidden_size, m.padded_vocab_size
    nq, ng = m.num_attention_heads, m.num_kv_heads
    per_layer = {"input_layernorm.weight": (h,), "self_attention.linear_qkv.weight": ((nq + 2 * ng) * d, h),
                 "self_attention.linear_proj.weight": (h, nq * d), "self_attention.q_layernorm.weight": (d,),
                 "self_attention.k_layernorm.weight": (d,), "pre_mlp_layernorm.weight": (h,),
                 "mlp.linear_fc1.weight": (2 * f, h), "mlp.linear_fc2.weight": (h, f),
                 "self_attention.q_proj_layernorm.weight": (nq * d,),
                 "self_attention.k_proj_layernorm.weight": (ng * d,),
                 "post_self_attn_layernorm.weight": (h,), "post_mlp_layernorm.weight": (h,)}
    out = {EMBED: (vp, h)}
    for i in range(m.num_layers):
        for s in layer_suffixes(m):
            out[_layer(i, s)] = per_layer[s]
    out[FINAL_NORM] = (h,)
    out[OUTPUT] = (vp, h)
    return out


def groups(m: ModelConfig) -> list[tuple[str, list[str]]]:
    """Canonical names in units of work: the embedding, each layer, then the final norm + head."""
    out = [("embedding", [EMBED])]
    out += [(f"layer {i}", [_layer(i, s) for s in layer_suffixes(m)]) for i in range(m.num_layers)]
    return out + [("head", [FINAL_NORM, OUTPUT])]


def shard_shape(name: str, full: tuple[int, ...], tp: int) -> tuple[int, ...]:
    dim = split_dim(name)
    if dim is None or tp == 1:
        return tuple(full)
    out = list(full)
    out[dim] //= tp
    return tuple(out)


def rules(m: ModelConfig) -> dict[str, Rule]:
    """Canonical local-spec name -> its rule, for every tensor of ``m``, in conversion order."""
    return {r.megatron: r for r in family_of(m).rules(m)}


def rule_for(name: str, m: ModelConfig) -> Rule:
    rule = rules(m).get(local_name(name))
    if rule is None:
        raise ConvertError(f"no {family_of(m).architecture} equivalent for {name}")
    return rule


def hf_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor, in the order the export writes them."""
    shapes = canonical_shapes(m)
    return {n: s for r in rules(m).values() for n, s in zip(r.hf_names, r.hf_shapes(shapes[r.megatron], m))}


def hf_names(name: str, m: ModelConfig) -> list[str]:
    """The HF tensor(s) one canonical (local or TE-spec) tensor becomes."""
    return list(rule_for(name, m).hf_names)


def canonical_to_hf(name: str, tensor: torch.Tensor, m: ModelConfig,
                    norm_gain_multiplier: float = 1.0) -> list[tuple[str, torch.Tensor]]:
    """One canonical tensor -> [(HF name, HF tensor)], in the checkpoint's dtype.

    ``norm_gain_multiplier`` multiplies RMSNorm gains on the way out: pure-bf16 training stores the
    gains divided by a scale factor (see :func:`norm_gain_multiplier`); 1.0 leaves them as stored.
    """
    rule = rule_for(name, m)
    parts = rule.to_hf(tensor, m)
    if rule.gain and norm_gain_multiplier != 1.0:
        parts = [t * norm_gain_multiplier for t in parts]
    return list(zip(rule.hf_names, parts))


def hf_to_canonical(name: str, get: Callable[[str], torch.Tensor], m: ModelConfig) -> torch.Tensor:
    """The canonical tensor ``name`` from the HF tensors ``get(hf_name)`` returns (padding rows of
    the vocab matrices are zeros)."""
    rule = rule_for(name, m)
    return rule.from_hf([get(n) for n in rule.hf_names], m)


def norm_gain_multiplier(meta: dict, recipe: Recipe | None = None) -> float:
    """What the stored norm gains must be multiplied by to get the model's true gains.

    Pure-bf16 training keeps the gains divided by a factor (Gaperon used 20; see model.RMSNorm)
    so that small Adam updates survive bf16 rounding near 1.0. Every checkpoint states its factor
    in ``meta.json`` under ``norm_gain_scale``; absent (older checkpoints), the gains are plain."""
    return norm_gain_scale(meta)


# --------------------------------------------------------------------------------------------
# HF config <-> recipe


def hf_config(recipe: Recipe, dtype: torch.dtype = torch.bfloat16, bos_token_id: int | None = None,
              eos_token_id: int | None = None) -> dict:
    """config.json of the HF equivalent of ``recipe.model`` (its family's, see hf_families.py).

    Written with both the transformers 5 keys (``rope_parameters``, ``dtype``) and the 4.x ones
    (``rope_theta``, ``rope_scaling``, ``torch_dtype``): each version reads its own and accepts the
    other's, so vLLM and older stacks load the export too."""
    m = recipe.model
    try:  # the version without importing transformers (seconds)
        from importlib.metadata import version as _version
        version = _version("transformers")
    except Exception:  # pragma: no cover - transformers is a requirement
        version = None
    theta = float(m.rope_theta)
    scaling = hf_rope_scaling(m)
    family = family_of(m)
    cfg = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_kv_heads,
        "head_dim": m.kv_channels,
        "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_position_embeddings,
        "rms_norm_eps": m.norm_eps,
        "hidden_act": "silu",
        "initializer_range": m.init_std,
        "rope_theta": theta,
        "rope_scaling": scaling,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta} if scaling is None
        else {**scaling, "rope_theta": theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "torch_dtype": _HF_DTYPE_NAME[dtype],
        "dtype": _HF_DTYPE_NAME[dtype],
    }
    cfg = family.config(cfg, m)
    if version:
        cfg["transformers_version"] = version
    return cfg


_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def hf_rope_scaling(m: ModelConfig) -> dict | None:
    """config.json's ``rope_scaling`` for ``model.rope_scaling`` (Llama-3.1's layout), or None."""
    rs = m.rope_scaling
    if rs is None:
        return None
    return {"rope_type": rs.type, "factor": float(rs.factor), "low_freq_factor": float(rs.low_freq_factor),
            "high_freq_factor": float(rs.high_freq_factor),
            "original_max_position_embeddings": int(rs.original_max_position_embeddings)}


def rope_scaling_from_hf(cfg: dict, problems: list[str]) -> dict | None:
    """``model.rope_scaling`` from config.json: transformers 4's ``rope_scaling`` or 5's
    ``rope_parameters`` (either may hold the llama3 values). Appends what cannot be represented
    to ``problems``."""
    found = []
    for key in ("rope_scaling", "rope_parameters"):
        d = cfg.get(key)
        if isinstance(d, dict):
            kind = d.get("rope_type", d.get("type", "default"))
            if kind != "default":
                found.append((key, kind, d))
        elif d is not None:
            problems.append(f"{key} is {d!r}; expected a dict or null")
    if not found:
        return None
    key, kind, d = found[0]
    if kind != "llama3":
        problems.append(f"{key} has rope_type {kind!r}; only 'default' (no scaling) and 'llama3' "
                        "(Llama-3.1/3.2 frequency scaling) convert")
        return None
    missing = [k for k in _LLAMA3_KEYS if not isinstance(d.get(k), (int, float)) or isinstance(d.get(k), bool)]
    if missing:
        problems.append(f"{key} (rope_type 'llama3') lacks {', '.join(missing)}: llama3 scaling needs "
                        f"{', '.join(_LLAMA3_KEYS)}")
        return None
    out = {"type": "llama3", **{k: d[k] for k in _LLAMA3_KEYS}}
    for other_key, other_kind, other in found[1:]:
        if other_kind != kind or any(other.get(k) != d[k] for k in _LLAMA3_KEYS):
            problems.append(f"rope_scaling and rope_parameters disagree ({d!r} vs {other!r})")
    return out


def recipe_from_hf_config(cfg: dict, name: str = "hf-import", tp: int = 1, pp: int = 1) -> Recipe:
    """A recipe whose model section is the HF config ``cfg`` (config.json's dict) of one of our
    families; layout tp x pp, everything else default. Refuses configs our blocks cannot represent."""
    problems = []
    mtype = cfg.get("model_type")
    family = next((f for f in FAMILIES if f.model_type == mtype), None)
    if family is None:
        known = ", ".join(f"{f.model_type!r} ({f.architecture})" for f in FAMILIES)
        problems.append(f"model_type is {mtype!r}; only {known} convert")
    else:
        problems += family.refuse(cfg)
    if cfg.get("tie_word_embeddings", False):
        problems.append("tie_word_embeddings is true; our models keep separate input embedding and "
                        "output head (untie them first: save lm_head as a copy of embed_tokens and set "
                        "tie_word_embeddings false)")
    if cfg.get("attention_bias", False):
        problems.append("attention_bias is true; our attention has no biases")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        problems.append(f"hidden_act is {act!r}; our MLP is SwiGLU (silu)")
    rope_scaling = rope_scaling_from_hf(cfg, problems)
    rp = cfg.get("rope_parameters") or {}
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0)) if isinstance(rp, dict) else cfg.get("rope_theta", 10000.0)
    if float(theta) != int(float(theta)):
        problems.append(f"rope_theta {theta} is not an integer; Megatron's rotary base is an integer")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size") if not isinstance(cfg.get(k), int)]
    if missing:
        problems.append(f"config.json lacks {', '.join(missing)}")
    if problems:
        raise ConvertError("cannot represent this Hugging Face model: " + "; ".join(problems))
    heads = cfg["num_attention_heads"]
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // heads
    maxpos = cfg.get("max_position_embeddings", 4096)
    tree = {
        "model": {"name": name, "hidden_size": hidden, "num_layers": cfg["num_hidden_layers"],
                  "num_attention_heads": heads, "num_kv_heads": cfg.get("num_key_value_heads") or heads,
                  "head_dim": head_dim, "ffn_hidden_size": cfg["intermediate_size"],
                  "vocab_size": cfg["vocab_size"], "max_position_embeddings": maxpos,
                  "rope_theta": float(theta), "rope_scaling": rope_scaling, "norm_eps": cfg.get("rms_norm_eps", 1e-6),
                  "init_std": cfg.get("initializer_range", 0.02), **family.model},
        "layout": {"tp": tp, "pp": pp, "vpp": 1, "dp": 1, "zero_stage": 1},
        "train": {"seq_len": min(maxpos, 4096)},
    }
    try:
        return recipe_from_tree(tree)
    except RecipeError as err:
        raise ConvertError(f"the Hugging Face config gives an invalid recipe at tp={tp}, pp={pp}: {err}") from None


# --------------------------------------------------------------------------------------------
# streaming safetensors


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


# --------------------------------------------------------------------------------------------
# output directories


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


# --------------------------------------------------------------------------------------------
# reading our checkpoints


def _reader(path):
    from .checkpoint import CheckpointReader

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


def _describe(m: ModelConfig) -> str:
    return (f"hidden {m.hidden_size}, {m.num_layers} layers, {m.num_attention_heads} heads, "
            f"{m.num_kv_heads} kv heads, head dim {m.kv_channels}, ffn {m.ffn_hidden_size}, "
            f"vocab {m.vocab_size} padded to {m.padded_vocab_size}")


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


def merge_into(name: str, out: torch.Tensor, part: torch.Tensor, tp_rank: int, tp_size: int) -> None:
    """Copy TP shard ``part`` into its place in the canonical tensor ``out`` (any dtype): after
    every rank's call, ``out`` equals ``sharding.merge`` of the shards, cast to ``out.dtype``, made
    in one pass (no merged fp32 copy first)."""
    dim = split_dim(name)
    if dim is None or tp_size == 1:
        if tp_rank == 0:
            out.copy_(part)
        return
    if name.endswith("mlp.linear_fc1.weight"):  # [gate; up]: each shard is [gate_r; up_r]
        for half, piece in zip(out.chunk(2, dim=0), part.chunk(2, dim=0)):
            half.chunk(tp_size, dim=0)[tp_rank].copy_(piece)
        return
    out.chunk(tp_size, dim=dim)[tp_rank].copy_(part)


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


# --------------------------------------------------------------------------------------------
# tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


# Tokens that end an assistant turn in the chat formats we know (Llama-3 <|eot_id|> and, for tool
# calls, <|eom_id|>; ChatML <|im_end|>; <|end_of_turn|> / Gemma's <end_of_turn>). generate() and
# vLLM stop at any id of generation_config.json's eos_token_id, so every one the vocab has goes there.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end_of_turn|>", "<end_of_turn>")


@dataclass
class TokenizerInfo:
    files: list[Path]
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    end_of_turn_ids: list[int] = None  # END_OF_TURN_TOKENS the vocab has, in that order

    @property
    def stop_ids(self) -> list[int]:
        """Every id that ends generation: EOS first, then the end-of-turn tokens."""
        out = [] if self.eos_id is None else [self.eos_id]
        return out + [i for i in self.end_of_turn_ids or [] if i not in out]


def _token_ids(path: Path, tokens) -> list[int]:
    """Ids of those of ``tokens`` the tokenizer at ``path`` has (HF tokenizer.json or sentencepiece)."""
    from .tokenizer import tokenizer_file

    f = tokenizer_file(path)
    if f is None:
        return []
    if f.name == "tokenizer.json":
        from tokenizers import Tokenizer as RustTokenizer

        tok = RustTokenizer.from_file(str(f))
        ids = [tok.token_to_id(t) for t in tokens]
    else:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(f))
        ids = [sp.piece_to_id(t) for t in tokens]
        ids = [i if 0 <= i < sp.get_piece_size() and sp.id_to_piece(i) == t else None for i, t in zip(ids, tokens)]
    return [i for i in ids if i is not None]


def _strip_bos(processor, bos_id: int) -> bool:
    """Remove BOS from a tokenizer.json post_processor (TemplateProcessing, possibly inside a
    Sequence), in place. True if anything was removed."""
    if not isinstance(processor, dict):
        return False
    if processor.get("type") == "Sequence":
        return any([_strip_bos(p, bos_id) for p in processor.get("processors", [])])
    if processor.get("type") != "TemplateProcessing":
        return False
    specials = processor.get("special_tokens", {})
    bos = {name for name, v in specials.items() if v.get("ids") == [bos_id]}
    if not bos:
        return False
    changed = False
    for key in ("single", "pair"):
        kept = [p for p in processor.get(key, []) if p.get("SpecialToken", {}).get("id") not in bos]
        changed |= len(kept) != len(processor.get(key, []))
        processor[key] = kept
    for name in bos:
        specials.pop(name)
    return changed


def export_tokenizer_files(tok: TokenizerInfo, dst: Path, model_max_length: int) -> list[str]:
    """Copy the tokenizer into ``dst`` as the model was trained with it; returns the names written.

    * No automatic BOS: pretraining documents are ``encode(text) + [EOS]`` with no BOS
      (preprocess.py) and SFT conversations get theirs from the chat template (``bos_token``),
      rendered without special tokens (sft.py). So ``tokenizer(text)`` must add none either:
      BOS is removed from tokenizer.json's post-processor and ``add_bos_token`` is false;
      ``apply_chat_template`` still starts with exactly one BOS.
    * ``model_max_length`` is the model's context, not the tokenizer's training config's.
    Every other byte of the files is copied as is."""
    names = []
    for f in tok.files:
        name = "tokenizer.model" if f.suffix == ".model" else f.name
        if name == "tokenizer.json" and tok.bos_id is not None:
            data = json.loads(f.read_text(encoding="utf-8"))
            if _strip_bos(data.get("post_processor"), tok.bos_id):
                (dst / name).write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
                names.append(name)
                continue
        if name == "tokenizer_config.json":
            continue
        shutil.copyfile(f, dst / name)
        names.append(name)
    src_cfg = next((f for f in tok.files if f.name == "tokenizer_config.json"), None)
    cfg = json.loads(src_cfg.read_text(encoding="utf-8")) if src_cfg else {}
    cfg.update(model_max_length=int(model_max_length), add_bos_token=False, add_eos_token=False)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    return names + ["tokenizer_config.json"]


def inspect_tokenizer(path: str | Path, model_vocab: int) -> TokenizerInfo:
    from .tokenizer import load_tokenizer

    p = Path(path)
    try:
        tok = load_tokenizer(p)
    except (FileNotFoundError, ValueError) as err:
        raise ConvertError(f"tokenizer {p}: {err}") from None
    if tok.vocab_size > model_vocab:
        raise ConvertError(f"tokenizer {p} has {tok.vocab_size:,} tokens but the model's vocab is "
                           f"{model_vocab:,}: ids >= {model_vocab:,} have no embedding row. Use the "
                           "tokenizer the model was trained with")
    if p.is_file():
        files = [p]
    else:
        files = [p / n for n in TOKENIZER_FILES if (p / n).is_file()]
    eot = [i for i in _token_ids(p, END_OF_TURN_TOKENS) if i < model_vocab]
    return TokenizerInfo(files, tok.vocab_size, tok.bos_id, tok.eos_id, eot)


# --------------------------------------------------------------------------------------------
# to-hf


def sft_data_tokenizer(recipe: Recipe) -> str:
    """The tokenizer an SFT run's data was prepared with (its meta.json names it), for a recipe
    without ``data.tokenizer``: an SFT export without its tokenizer has no chat template and no
    BOS/EOS ids, so one that cannot be found is an error, not a silent omission."""
    meta_path = Path(recipe.data.sft_path) / "meta.json"
    try:
        named = json.loads(meta_path.read_text()).get("tokenizer")
    except (OSError, ValueError):
        named = None
    if named and Path(named).exists():
        return named
    why = (f"{meta_path} is not readable here" if named is None
           else f"the tokenizer its data was prepared with ({named}, named in {meta_path}) is not here")
    raise ConvertError(f"this SFT checkpoint's recipe has no data.tokenizer and {why}: pass --tokenizer DIR "
                       "(the tokenizer tools/prepare_sft.py used), so the export gets its chat template and "
                       "BOS/EOS ids")


@dataclass
class VerifyResult:
    max_abs_diff: float
    max_abs_logit: float
    vocab_tensor_diff: float
    layers: int
    num_layers: int
    vocab_rows: int
    vocab_size: int
    tol: float

    @property
    def ok(self) -> bool:
        return self.vocab_tensor_diff == 0.0 and self.max_abs_diff <= self.tol * max(1.0, self.max_abs_logit)

    def __str__(self) -> str:
        scope = ("the whole model" if self.layers == self.num_layers and self.vocab_rows == self.vocab_size
                 else f"first {self.layers} of {self.num_layers} layers, logits on vocab rows "
                      f"[0, {self.vocab_rows}) of {self.vocab_size}")
        return (f"verify: max abs logit diff {self.max_abs_diff:.3e} (max |logit| {self.max_abs_logit:.3g}; "
                f"{scope}); embedding/lm_head tensors max abs diff {self.vocab_tensor_diff:.3e}; "
                f"tolerance {self.tol:g} x max(1, max |logit|): {'OK' if self.ok else 'FAILED'}")


def _progress(it, desc: str, enabled: bool, total: int | None = None):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, unit="layer", total=total, file=sys.stderr, dynamic_ncols=True)


def to_hf(ckpt: str | Path, out: str | Path, dtype: str = "bf16", shard_size: str | int = "5GB",
          tokenizer: str | Path | None = None, overwrite: bool = False, verify_layers: int | None = 2,
          norm_gain_multiplier_: float | None = None, progress: bool = True,
          log: Callable[[str], None] = print) -> Path:
    """Export a checkpoint (any layout) to an HF directory of its family (hf_families.py). ``verify_layers=None`` skips
    the final check; otherwise the first ``verify_layers`` layers are compared (see :func:`verify`).
    ``norm_gain_multiplier_`` overrides the factor read from the checkpoint's meta.json."""
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    tdtype, max_bytes = DTYPES[dtype], parse_size(shard_size)
    t0 = time.perf_counter()
    reader = _reader(ckpt)
    recipe = reader.recipe
    m = recipe.model
    gain = norm_gain_multiplier(reader.meta, recipe) if norm_gain_multiplier_ is None else norm_gain_multiplier_
    where = check_checkpoint(reader, m)
    tok_path = tokenizer if tokenizer is not None else recipe.data.tokenizer
    if tok_path is None and recipe.data.kind == "sft":
        tok_path = sft_data_tokenizer(recipe)
    tok = None
    if tok_path is not None:
        if tokenizer is None and not Path(tok_path).exists():
            log(f"warning: the recipe's tokenizer {tok_path} is not here; exporting without tokenizer files "
                "(pass --tokenizer DIR)")
        else:
            tok = inspect_tokenizer(tok_path, m.vocab_size)
    config = hf_config(recipe, tdtype, tok.bos_id if tok else None, tok.eos_id if tok else None)

    entries = [(n, tdtype, s) for n, s in hf_shapes(m).items()]
    shards = plan_shards(entries, max_bytes)
    nshards = len(shards)
    shard_names = [f"model-{i + 1:05d}-of-{nshards:05d}.safetensors" for i in range(nshards)]
    weight_map = {e[0]: shard_names[i] for i, sh in enumerate(shards) for e in sh}
    conflicts = ("model.safetensors", "pytorch_model.bin", "pytorch_model.bin.index.json")
    with _Staging(out, overwrite, conflicts) as staging:
        tmp = staging.tmp
        writers: dict[int, StreamingSafetensorsWriter] = {}
        shard_of = {e[0]: i for i, sh in enumerate(shards) for e in sh}

        def writer(hf: str) -> StreamingSafetensorsWriter:
            i = shard_of[hf]
            if i not in writers:
                for j in [j for j in writers if j < i]:  # shards fill in order: earlier ones are done
                    writers.pop(j).close()
                # no fsync, as save_pretrained: an export can be redone, and the staging dir
                # already keeps a crashed conversion from leaving a half-written OUT
                writers[i] = StreamingSafetensorsWriter(tmp / shard_names[i], shards[i], {"format": "pt"},
                                                        fsync=False)
            return writers[i]

        with _all_written(writers):
            for label, names in _progress(groups(m), "to-hf", progress):
                for n in names:
                    if n in VOCAB_TENSORS:
                        hf = hf_names(n, m)[0]
                        for block in iter_ckpt_rows(reader, where[n], m.vocab_size):
                            writer(hf).append(hf, block)
                        continue
                    # merged straight into the export dtype; norm gains in fp32 (they may be scaled)
                    t = read_merged(reader, where[n], torch.float32 if is_norm_gain(n) else tdtype)
                    for hn, part in canonical_to_hf(n, t, m, gain):
                        writer(hn).append(hn, part)
                    del t
        total = sum(_nbytes(e[1], e[2]) for e in entries)
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total, "total_parameters": sum(math.prod(e[2]) for e in entries)},
             "weight_map": weight_map}, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        stop = tok.stop_ids if tok else []
        gen = {"bos_token_id": config["bos_token_id"],
               "eos_token_id": stop if len(stop) > 1 else config["eos_token_id"]}
        if "transformers_version" in config:
            gen["transformers_version"] = config["transformers_version"]
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        tok_names = export_tokenizer_files(tok, tmp, m.max_position_embeddings) if tok else []
        stale = sorted(p.name for p in Path(out).glob("model-*-of-*.safetensors") if p.name not in shard_names)
        staging.commit(shard_names + tok_names + ["config.json", "generation_config.json",
                                                  "model.safetensors.index.json"])
    if stale:
        log(f"note: {out} still holds {', '.join(stale)} from an earlier export; the new index does not "
            "use them (delete them to save space)")
    log(f"wrote {out}: {nshards} shard(s), {total / 1e9:.2f} GB {dtype}, vocab {m.vocab_size} "
        f"(padded {m.padded_vocab_size} in the checkpoint){', tokenizer ' + str(tok_path) if tok else ''}"
        f"{f', norm gains x {gain:g}' if gain != 1.0 else ''} in {time.perf_counter() - t0:.1f} s")
    if verify_layers is not None:
        result = verify(reader.path, out, layers=verify_layers, vocab_rows=VERIFY_VOCAB_ROWS,
                        norm_gain_multiplier_=gain)
        log(str(result))
        if not result.ok:
            raise VerifyError(f"the export in {out} does not compute what {reader.path} computes ({result}); "
                              "it is left in place for inspection")
    return Path(out)


# --------------------------------------------------------------------------------------------
# verify


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


def _hf_model(hf_dir: Path, files: _HFFiles, layers: int, vocab_rows: int, full: bool):
    """The HF model in fp32: from_pretrained when whole (this also checks transformers' loader),
    else built on the meta device from the first ``layers`` layers and ``vocab_rows`` vocab rows."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if full:
        return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True).eval()
    cfg = AutoConfig.from_pretrained(str(hf_dir), local_files_only=True)
    cfg.num_hidden_layers, cfg.vocab_size = layers, vocab_rows
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:layers]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    sd = {}
    for name in model.state_dict():
        rows = (0, vocab_rows) if name in ("model.embed_tokens.weight", "lm_head.weight") else None
        sd[name] = files.get(name, rows).float()
    model.load_state_dict(sd, strict=True, assign=True)
    for mod_name, mod in list(model.named_modules()):  # non-persistent buffers (rotary inv_freq)
        if any(b.is_meta for b in mod.buffers(recurse=False)):
            parent = model.get_submodule(mod_name.rsplit(".", 1)[0]) if "." in mod_name else model
            setattr(parent, mod_name.rsplit(".", 1)[-1], type(mod)(config=cfg))
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise ConvertError(f"could not materialise {leftover[:3]} of the truncated HF model")
    return model.eval()


def verify(ckpt: str | Path, hf_dir: str | Path, layers: int | None = None, vocab_rows: int | None = None,
           num_seqs: int = 3, seq_len: int = 32, seed: int = 0, tol: float = 1e-3,
           norm_gain_multiplier_: float | None = None) -> VerifyResult:
    """Logits of the checkpoint's Megatron model (tp=pp=dp=1, fp32, CPU) vs the HF model in
    ``hf_dir`` on ``num_seqs`` fixed random sequences; also the embedding and lm_head tensors
    compared in full. ``layers``/``vocab_rows`` truncate both models (first K layers, first N vocab
    rows) so the check stays cheap at 24B. The Megatron weights are rounded through the HF files'
    dtype first, so only the mapping and the arithmetic order can differ.

    Runs Megatron in this process with the CPU device layer (a process-wide TorchFunctionMode):
    call it from a CLI process, not from a long-lived one that will use a GPU afterwards."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    reader = _reader(ckpt)
    recipe, files = reader.recipe, _HFFiles(hf_dir)
    m = recipe.model
    where = check_checkpoint(reader, m)
    hf_cfg = json.loads((Path(hf_dir) / "config.json").read_text())
    for key, ours in (("hidden_size", m.hidden_size), ("num_hidden_layers", m.num_layers),
                      ("num_attention_heads", m.num_attention_heads), ("num_key_value_heads", m.num_kv_heads),
                      ("intermediate_size", m.ffn_hidden_size), ("vocab_size", m.vocab_size)):
        if hf_cfg.get(key) != ours:
            raise ConvertError(f"{hf_dir}/config.json has {key}={hf_cfg.get(key)} but the checkpoint's model "
                               f"has {ours}: these are different models")
    gain = norm_gain_multiplier(reader.meta, recipe) if norm_gain_multiplier_ is None else norm_gain_multiplier_
    k = m.num_layers if layers is None or layers <= 0 else min(layers, m.num_layers)
    v = m.vocab_size if vocab_rows is None else min(vocab_rows, m.vocab_size)
    missing = [h for h in hf_shapes(m) if h not in files.shapes()]
    if missing:
        raise ConvertError(f"{hf_dir} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")

    def hf_dtype(canonical: str) -> torch.dtype:  # round our weights as the HF file stores them
        return files.dtype(hf_names(canonical, m)[0])

    # 1. the vocab matrices, in full, block by block (the logits below see only v rows)
    vocab_diff = 0.0
    for n in VOCAB_TENSORS:
        hf = hf_names(n, m)[0]
        start = 0
        for block in iter_ckpt_rows(reader, where[n], m.vocab_size):
            mine = block.to(hf_dtype(n)).float()
            theirs = files.get(hf, (start, start + block.shape[0])).float()
            vocab_diff = max(vocab_diff, (mine - theirs).abs().max().item())
            start += block.shape[0]

    # 2. Megatron, truncated, tp=pp=dp=1 fp32 on CPU
    tree = recipe.model_dump(mode="json")
    tree["model"].update(num_layers=k, vocab_size=v)
    tree["layout"].update(tp=1, pp=1, vpp=1, dp=1, zero_stage=0, sequence_parallel=False, micro_batch=1,
                          global_batch=1, recompute="none")
    s = min(seq_len, m.max_position_embeddings)
    tree["train"].update(precision="fp32", attention="sdpa", seq_len=s)
    small = recipe_from_tree(tree)
    started_here = False
    if not dist.is_initialized():
        os.environ.update(GAPERON_DEVICE="cpu", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        started_here = True
    from .engine import init_distributed
    from .model import build_model, canonical_names

    init_distributed(small)
    try:
        chunk = build_model(small, on_gpu=False)[0]
        names = canonical_names(chunk)
        with torch.no_grad():
            for local, p in chunk.named_parameters():
                n = local_name(names[local])
                if n in VOCAB_TENSORS:
                    t = torch.zeros(p.shape, dtype=torch.float32)
                    t[:v] = read_ckpt_rows(reader, where[n], v).float()
                else:
                    t = reader.get(where[n]).float()
                    if is_norm_gain(n) and gain != 1.0:
                        t = t * gain
                if tuple(t.shape) != tuple(p.shape):
                    raise ConvertError(f"{n}: checkpoint shape {tuple(t.shape)} vs model {tuple(p.shape)}")
                p.copy_(t.to(hf_dtype(n)).float())
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, v, (num_seqs, s), generator=gen)
        pos = torch.arange(s).unsqueeze(0).expand_as(tokens)
        chunk.eval()
        with torch.no_grad():
            ours = chunk(tokens, pos, None)[..., :v].float()
        del chunk
        # 3. Hugging Face
        model = _hf_model(Path(hf_dir), files, k, v, full=(k == m.num_layers and v == m.vocab_size))
        with torch.no_grad():
            theirs = model(input_ids=tokens).logits.float()
    finally:
        if started_here:
            ps.destroy_model_parallel()
            dist.destroy_process_group()
    return VerifyResult(max_abs_diff=(ours - theirs).abs().max().item(), max_abs_logit=ours.abs().max().item(),
                        vocab_tensor_diff=vocab_diff, layers=k, num_layers=m.num_layers, vocab_rows=v,
                        vocab_size=m.vocab_size, tol=tol)


# --------------------------------------------------------------------------------------------
# from-hf


def stage_of(name: str, m: ModelConfig, pp: int) -> int:
    """Pipeline stage (vpp 1) holding canonical tensor ``name``."""
    if name == EMBED:
        return 0
    if name in (FINAL_NORM, OUTPUT):
        return pp - 1
    return int(LAYER_RE.match(name).group(1)) // (m.num_layers // pp)


def write_checkpoint(out: str | Path, recipe: Recipe, canonical: Callable[[str], torch.Tensor],
                     vocab_rows: Callable[[str, int, int], torch.Tensor], overwrite: bool = False,
                     spec: str = "local", extra_meta: dict | None = None, progress: bool = True,
                     desc: str = "write") -> Path:
    """Write a step-0, weights-only checkpoint directory exactly as ``checkpoint.save`` lays one
    out for ``recipe.layout`` (tp x pp ranks, dp 1): one ``tpXX_ppYY_w000.safetensors`` per rank,
    replicated tensors in every TP rank's file, and meta.json with the same index schema.

    ``canonical(name)`` gives each non-vocab canonical tensor (fp32); ``vocab_rows(name, a, b)``
    rows [a, b) of a vocab matrix below ``model.vocab_size`` (the padding rows are zeros). One
    layer is in memory at a time; the vocab matrices go by blocks of rows."""
    if spec not in ("local", "te"):
        raise ConvertError(f"spec {spec!r}: choose local or te")
    m, lay = recipe.model, recipe.layout
    tp, pp = lay.tp, lay.pp
    if lay.vpp != 1:
        raise ConvertError("writing checkpoints with layout.vpp > 1 is not supported (and never needed: "
                           "checkpoints load at any layout)")
    full_shapes = canonical_shapes(m)
    stored = {n: (te_name(n) if spec == "te" else n) for n in full_shapes}
    fname = {(r, p): f"tp{r:02d}_pp{p:02d}_w000.safetensors" for r in range(tp) for p in range(pp)}
    plan: dict[tuple[int, int], list] = {k: [] for k in fname}
    for n, s in full_shapes.items():
        for r in range(tp):
            plan[(r, stage_of(n, m, pp))].append((f"model/{stored[n]}", torch.float32, shard_shape(n, s, tp)))
    # Each TP shard stored whole, as one part (checkpoint.Part) starting at element 0.
    index = {f"model/{stored[n]}": [{"shape": list(shard_shape(n, s, tp)),
                                     "parts": [[fname[(r, stage_of(n, m, pp))], f"model/{stored[n]}", 0,
                                                math.prod(shard_shape(n, s, tp))]]} for r in range(tp)]
             for n, s in full_shapes.items()}
    block_rows = _rows_block(m.hidden_size)

    with _Staging(out, overwrite) as staging:
        writers = {k: StreamingSafetensorsWriter(staging.tmp / fname[k], plan[k]) for k in fname}
        with _all_written(writers):
            for _, names in _progress(groups(m), desc, progress):
                for n in names:
                    p, key = stage_of(n, m, pp), f"model/{stored[n]}"
                    if n in VOCAB_TENSORS:
                        rows_per = m.padded_vocab_size // tp
                        for r in range(tp):
                            for a in range(r * rows_per, (r + 1) * rows_per, block_rows):
                                b = min(a + block_rows, (r + 1) * rows_per)
                                block = torch.zeros(b - a, m.hidden_size, dtype=torch.float32)
                                real = max(0, min(b, m.vocab_size) - a)
                                if real:
                                    block[:real] = vocab_rows(n, a, a + real)
                                writers[(r, p)].append(key, block)
                        continue
                    full = canonical(n).to(torch.float32)
                    for r in range(tp):
                        writers[(r, p)].append(key, shard(n, full, r, tp).contiguous())
                    del full
        files = {fname[k]: (staging.tmp / fname[k]).stat().st_size for k in sorted(fname)}
        # Step 0, weights only, dp 1; norm gain scale 1.0: HF gains are the true gains (loading rescales them).
        meta = {**build_meta(recipe, 0, 0, 0, 0, 1, tp * pp, 1.0, files, dict(sorted(index.items()))),
                **(extra_meta or {})}
        (staging.tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        staging.commit([fname[k] for k in sorted(fname)] + ["meta.json"])
    return Path(out)


IMPORT_RECIPE = "recipe.yaml"  # from-hf writes it next to the checkpoint files


def write_import_recipe(out: str | Path, recipe: Recipe, hf_dir: Path) -> Path:
    """``out/recipe.yaml``: the imported model, the layout it was written at and
    ``checkpoint.init_from`` naming ``out``, so that a recipe with ``base: <this file>`` needs only
    its data, schedule and steps to train from the import (weights only: init_mode model)."""
    import yaml

    out = Path(out).resolve()
    lay = recipe.layout
    tree = {"model": recipe.model.model_dump(mode="json"),
            "layout": {"tp": lay.tp, "pp": lay.pp, "vpp": 1, "dp": lay.dp, "zero_stage": lay.zero_stage},
            "train": {"seq_len": recipe.train.seq_len},
            "checkpoint": {"init_from": str(out), "init_mode": "model"}}
    text = (f"# Written by `tools/convert_checkpoint.py from-hf {hf_dir}`: the imported model and the\n"
            f"# checkpoint beside this file. Start SFT or continued pretraining from it with\n"
            f"#   base: {out / IMPORT_RECIPE}\n"
            "# and the data, optimizer, schedule and steps of the new phase (see recipes/sft-*.yaml).\n"
            + yaml.safe_dump(tree, sort_keys=False))
    tmp = out / f".{IMPORT_RECIPE}.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / IMPORT_RECIPE)
    return out / IMPORT_RECIPE


def from_hf(hf_dir: str | Path, out: str | Path, tp: int = 1, pp: int = 1, recipe_name: str | None = None,
            overwrite: bool = False, spec: str = "local", verify_layers: int | None = 2,
            progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """An HF directory (Llama, Qwen3 or OLMo-2) -> a checkpoint directory ``out`` in our format,
    saved as if by tp x pp ranks (dp 1): step 0, fp32 weights, no optimizer states. Start a phase from it with
    ``checkpoint.init_from=<out>`` (checkpoint.init_mode=model), or base a recipe on the
    ``out/recipe.yaml`` written beside it (:func:`write_import_recipe`). ``spec='te'`` names the fused
    norm gains the Transformer Engine way."""
    hf_dir = Path(hf_dir)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise ConvertError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    cfg = json.loads(cfg_path.read_text())
    recipe = recipe_from_hf_config(cfg, recipe_name or hf_dir.resolve().name, tp, pp)
    m = recipe.model
    files = _HFFiles(hf_dir)
    shapes = files.shapes()
    want = hf_shapes(m)
    for n, s in want.items():
        if n not in shapes:
            raise ConvertError(f"{hf_dir} has no tensor {n}, which its config.json ({_describe(m)}) needs")
        if shapes[n][0] != s:
            raise ConvertError(f"{n} in {hf_dir} has shape {shapes[n][0]} but its config.json ({_describe(m)}) "
                               f"needs {s}")
        if shapes[n][1] not in _ST_DTYPE:
            raise ConvertError(f"{n} in {hf_dir} has dtype {shapes[n][1]}; expected a float type")
    extra = sorted(n for n in shapes if n not in want and not n.endswith("rotary_emb.inv_freq"))
    if extra:
        raise ConvertError(f"{hf_dir} has tensors a {family_of(m).architecture} of this config does not: {', '.join(extra[:4])}"
                           f"{' ...' if len(extra) > 4 else ''}")

    write_checkpoint(out, recipe, canonical=lambda n: hf_to_canonical(n, lambda h: files.get(h).float(), m),
                     vocab_rows=lambda n, a, b: files.get(hf_names(n, m)[0], (a, b)).float(),
                     overwrite=overwrite, spec=spec, extra_meta={"converted_from": str(hf_dir.resolve())},
                     progress=progress, desc="from-hf")
    recipe_path = write_import_recipe(out, recipe, hf_dir)
    log(f"wrote {out}: checkpoint (step 0, fp32 weights, no optimizer state) at tp={tp} pp={pp} of "
        f"{m.name} ({m.num_params() / 1e9:.3g}B params); start a phase from it with checkpoint.init_from={out}, "
        f"or base an SFT / continued-pretraining recipe on it: base: {recipe_path}")
    if verify_layers is not None:
        result = verify(out, hf_dir, layers=verify_layers, vocab_rows=VERIFY_VOCAB_ROWS)
        log(str(result))
        if not result.ok:
            raise VerifyError(f"{out} does not compute what {hf_dir} computes ({result})")
    return Path(out)


# --------------------------------------------------------------------------------------------
# command line


def build_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description="Convert between our training checkpoints and Hugging Face directories "
                    "(LlamaForCausalLM, Qwen3ForCausalLM, Olmo2ForCausalLM).")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-hf", help="training checkpoint (any TP/PP/ZeRO layout) -> HF directory")
    a.add_argument("ckpt", help="checkpoint dir, a run's checkpoints/ dir, or a run dir (uses 'latest')")
    a.add_argument("out", help="output directory (new or empty, unless --overwrite)")
    a.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default="bf16", help="weight dtype (default bf16)")
    a.add_argument("--shard-size", default="5GB", help="max bytes per safetensors shard (default 5GB)")
    a.add_argument("--tokenizer", help="tokenizer dir (or .model file) to copy; default: the recipe's data.tokenizer")
    a.add_argument("--overwrite", action="store_true", help="replace the files this writes in a non-empty OUT")
    a.add_argument("--no-verify", action="store_true", help="skip the final logits check")
    a.add_argument("--verify-layers", type=int, default=2, help="layers the final check runs (default 2; 0 = all)")
    a.add_argument("--no-progress", action="store_true")
    b = sub.add_parser("from-hf", help="HF directory -> checkpoint in our format (step 0, weights only)")
    b.add_argument("hf_dir")
    b.add_argument("out", help="output checkpoint directory; use it as checkpoint.init_from=OUT")
    b.add_argument("--recipe-name", help="model.name in the derived recipe (default: the HF directory name)")
    b.add_argument("--tp", type=int, default=1, help="tensor-parallel shards to write (default 1)")
    b.add_argument("--pp", type=int, default=1, help="pipeline stages to write (default 1)")
    b.add_argument("--spec", choices=["local", "te"], default="local",
                   help="parameter names of Megatron's local layer spec (default) or Transformer Engine's")
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--no-verify", action="store_true")
    b.add_argument("--verify-layers", type=int, default=2)
    b.add_argument("--no-progress", action="store_true")
    c = sub.add_parser("verify", help="compare the logits of a checkpoint and an HF directory")
    c.add_argument("ckpt")
    c.add_argument("hf_dir")
    c.add_argument("--layers", type=int, default=0, help="compare only the first K layers (default 0 = all)")
    c.add_argument("--vocab-rows", type=int, default=0, help="logits on the first N vocab rows only (0 = all)")
    c.add_argument("--tol", type=float, default=1e-3, help="max abs diff allowed, x max(1, max |logit|)")
    c.add_argument("--seqs", type=int, default=3)
    c.add_argument("--seq-len", type=int, default=32)
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 verification failed, 2 bad input (the message says which and why)."""
    from .checkpoint import CheckpointError

    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "to-hf":
            to_hf(args.ckpt, args.out, dtype=args.dtype, shard_size=args.shard_size, tokenizer=args.tokenizer,
                  overwrite=args.overwrite, verify_layers=None if args.no_verify else args.verify_layers,
                  progress=not args.no_progress)
        elif args.cmd == "from-hf":
            from_hf(args.hf_dir, args.out, tp=args.tp, pp=args.pp, recipe_name=args.recipe_name,
                    overwrite=args.overwrite, spec=args.spec,
                    verify_layers=None if args.no_verify else args.verify_layers, progress=not args.no_progress)
        else:
            result = verify(args.ckpt, args.hf_dir, layers=args.layers or None, vocab_rows=args.vocab_rows or None,
                            num_seqs=args.seqs, seq_len=args.seq_len, tol=args.tol)
            print(result, flush=True)
            return 0 if result.ok else 1
    except (ConvertError, CheckpointError, RecipeError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except OSError as err:  # an unwritable output path, a full disk: nothing was moved into place
        print(f"error: {err.filename or ''}: {err.strerror or err}: choose a writable output directory with "
              "free space (nothing was written there)", file=sys.stderr, flush=True)
        return 2
    except VerifyError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0
