"""Rules that map one Megatron tensor to its Hugging Face tensor(s), one class per kind of tensor.

A Hugging Face *family* (families.py) is a table of these rules plus its config.json builder;
the converter (this package) streams every tensor through its family's rule. A rule knows the names
on both sides, how the tensor's TP shards are cut (``tp_split``: asked of sharding.split_dim, the
one owner of split dims; the class names ColumnParallel / RowParallel only say so to the reader),
and how to reshape the tensor each way. Names in a family's layer table are
relative to one layer (``decoder.layers.<i>.`` / the family's ``hf_layer`` prefix).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ..config import ModelConfig
from ..sharding import split_dim


@dataclass(frozen=True)
class Rule:
    """One canonical tensor <-> one HF tensor of the same shape, copied as is."""

    megatron: str                 # canonical (local-spec) name
    hf: str | tuple[str, ...]     # the HF name(s) it becomes
    gain: ClassVar[bool] = False  # an RMSNorm gain: stored gains x the checkpoint's factor on export

    @property
    def tp_split(self) -> int | None:
        """The dim split across TP ranks (None: replicated), as sharding.split_dim says."""
        return split_dim(self.megatron)

    @property
    def hf_names(self) -> tuple[str, ...]:
        return (self.hf,) if isinstance(self.hf, str) else tuple(self.hf)

    def at(self, layer: int, hf_prefix: str) -> "Rule":
        """This rule for layer ``layer`` (names made absolute)."""
        return dataclasses.replace(self, megatron=f"decoder.layers.{layer}.{self.megatron}",
                                   hf=tuple(hf_prefix.format(i=layer) + n for n in self.hf_names))

    def hf_shapes(self, shape: tuple[int, ...], m: ModelConfig) -> list[tuple[int, ...]]:
        return [tuple(shape)]

    def to_hf(self, t: torch.Tensor, m: ModelConfig) -> list[torch.Tensor]:
        return [t]

    def from_hf(self, ts: list[torch.Tensor], m: ModelConfig) -> torch.Tensor:
        return ts[0]


class Replicated(Rule):
    """Whole on every TP rank."""


class Norm(Replicated):
    """An RMSNorm gain (hidden-wide, or head_dim-wide for per-head QK-norm), whole on every rank."""

    gain = True


class ColumnParallel(Rule):
    """Output rows split across TP ranks."""


class RowParallel(Rule):
    """Input columns split across TP ranks."""


class ColumnParallelNorm(Norm):
    """An RMSNorm gain over a whole column-parallel projection (OLMo-2's QK-norm): split like the
    heads of that projection."""


class VocabParallel(ColumnParallel):
    """Embedding / output layer: rows padded to ``padded_vocab_size`` here, cut to the
    tokenizer's ``vocab_size`` in HF (padding rows come back as zeros)."""

    def hf_shapes(self, shape, m):
        return [(m.vocab_size, *shape[1:])]

    def to_hf(self, t, m):
        return [t[: m.vocab_size]]

    def from_hf(self, ts, m):
        t = ts[0]
        pad = m.padded_vocab_size - t.shape[0]
        return torch.cat([t, t.new_zeros(pad, *t.shape[1:])]) if pad else t


class FusedQKV(ColumnParallel):
    """Megatron's linear_qkv -> q_proj, k_proj, v_proj. Rows are grouped per KV group g as
    [q heads of g, k_g, v_g] (view [groups, q_per_group + 2, head_dim, hidden]); HF keeps the
    three projections apart, each in head order."""

    def _split(self, m: ModelConfig) -> tuple[int, int, int]:
        ng = m.num_kv_heads
        return ng, m.num_attention_heads // ng, m.kv_channels

    def hf_shapes(self, shape, m):
        ng, per, d = self._split(m)
        return [(ng * per * d, shape[1]), (ng * d, shape[1]), (ng * d, shape[1])]

    def to_hf(self, t, m):
        ng, per, d = self._split(m)
        h = t.shape[-1]
        g = t.view(ng, per + 2, d, h)
        return [g[:, :per].reshape(-1, h), g[:, per].reshape(-1, h), g[:, per + 1].reshape(-1, h)]

    def from_hf(self, ts, m):
        ng, per, d = self._split(m)
        q, k, v = ts
        h = q.shape[-1]
        return torch.cat([q.view(ng, per, d, h), k.view(ng, 1, d, h), v.view(ng, 1, d, h)], dim=1).reshape(-1, h)


class GatedMLP(ColumnParallel):
    """Megatron's linear_fc1 = [gate; up] -> gate_proj, up_proj (each TP shard holds
    [gate_r; up_r]; sharding.py cuts it that way)."""

    def hf_shapes(self, shape, m):
        return [(shape[0] // 2, shape[1])] * 2

    def to_hf(self, t, m):
        return list(t.chunk(2, dim=0))

    def from_hf(self, ts, m):
        return torch.cat(ts, dim=0)


TIED_HEAD = "output_layer.weight"  # absent from tied models (model.tie_embeddings): lm_head = embed_tokens


@dataclass(frozen=True)
class Family:
    """One transformers architecture: which recipes it holds, and its tensors' rules.

    ``model`` holds the recipe model fields that select this family (and that an import sets);
    ``config`` turns the keys every family shares (hf_config.hf_config) into this family's
    config.json; ``refuse`` lists what of an HF config.json of this type we cannot represent."""

    architecture: str
    model_type: str
    model: dict
    head: tuple[Rule, ...]        # embedding: before the layers
    layer: tuple[Rule, ...]       # one layer, names relative to it, in conversion order
    tail: tuple[Rule, ...]        # final norm and output layer: after the layers
    config: Callable[[dict, ModelConfig], dict]
    refuse: Callable[[dict], list[str]] = lambda cfg: []
    hf_layer: str = "model.layers.{i}."

    def holds(self, m: ModelConfig) -> bool:
        return all(getattr(m, k) == v for k, v in self.model.items())

    def rules(self, m: ModelConfig) -> list[Rule]:
        """Every rule of a model of ``m``'s depth, absolute names, in conversion order."""
        layers = [r.at(i, self.hf_layer) for i in range(m.num_layers) for r in self.layer]
        rules = [*self.head, *layers, *self.tail]
        if m.tie_embeddings:  # the head is the input embedding: no output layer, no lm_head tensor
            rules = [r for r in rules if r.megatron != TIED_HEAD]
        return rules
