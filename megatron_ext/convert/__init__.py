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
of rules in families.py, one rule per tensor (mapping.py: fused QKV, gated MLP, norms,
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

Modules, one job each; imports point one way (mapping <- families <- names <- hf_config,
safetensors_io, ckpt_read, tokenizer_export <- verify <- to_hf, from_hf <- cli):

* names: canonical names and shapes, the family and rule of each tensor, errors, dtypes, sizes
* mapping, families: the per-tensor rules, and each family's table of them + its config.json
* hf_config: config.json <-> recipe (rope scaling both ways), the norm-gain factor
* safetensors_io: streaming safetensors writer, shard plans, HF directory reads, staging dirs
* ckpt_read: checking and reading our checkpoints TP shard by shard
* tokenizer_export: the tokenizer files an export ships
* to_hf, verify, from_hf: the three jobs; cli: their command line

TP split dims have one owner, sharding.split_dim: the rules' ``tp_split`` and the merge of TP
shards (sharding.merge_into) ask it.
"""
from __future__ import annotations

# cli loads every submodule; the names below are bound after it, so ``convert.to_hf``, ``from_hf``,
# ``verify`` and ``hf_config`` are the functions, not the modules of the same name.
from .cli import build_parser, main
from ..sharding import merge_into
from .ckpt_read import check_checkpoint, iter_ckpt_rows, read_ckpt_rows, read_merged
from .families import FAMILIES
from .from_hf import IMPORT_RECIPE, from_hf, write_checkpoint, write_import_recipe
from .hf_config import (hf_config, hf_rope_scaling, norm_gain_multiplier, recipe_from_hf_config,
                        rope_scaling_from_hf)
from .mapping import Family, Rule
from .names import (DTYPES, EMBED, FINAL_NORM, OUTPUT, VOCAB_TENSORS, ConvertError, VerifyError, canonical_shapes,
                    canonical_to_hf, family_of, groups, hf_names, hf_shapes, hf_to_canonical, layer_suffixes,
                    parse_size, rule_for, rules, shard_shape, stage_of)
from .safetensors_io import StreamingSafetensorsWriter, plan_shards
from .to_hf import to_hf
from .tokenizer_export import (END_OF_TURN_TOKENS, TOKENIZER_FILES, TokenizerInfo, export_tokenizer_files,
                               inspect_tokenizer, sft_data_tokenizer)
from .verify import VERIFY_VOCAB_ROWS, VerifyResult, verify

__all__ = [
    "ConvertError", "VerifyError", "DTYPES", "parse_size", "EMBED", "FINAL_NORM", "OUTPUT", "VOCAB_TENSORS",
    "family_of", "layer_suffixes", "canonical_shapes", "groups", "shard_shape", "rules", "rule_for", "hf_shapes",
    "hf_names", "canonical_to_hf", "hf_to_canonical", "stage_of", "FAMILIES", "Family", "Rule",
    "norm_gain_multiplier", "hf_config", "hf_rope_scaling", "rope_scaling_from_hf",
    "recipe_from_hf_config", "StreamingSafetensorsWriter", "plan_shards", "check_checkpoint", "iter_ckpt_rows",
    "merge_into", "read_merged", "read_ckpt_rows", "TOKENIZER_FILES", "END_OF_TURN_TOKENS", "TokenizerInfo",
    "export_tokenizer_files", "inspect_tokenizer", "sft_data_tokenizer", "VERIFY_VOCAB_ROWS", "VerifyResult",
    "verify", "to_hf", "IMPORT_RECIPE", "write_checkpoint", "write_import_recipe", "from_hf", "build_parser", "main",
]
