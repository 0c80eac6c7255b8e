"""to-hf: a training checkpoint at any layout -> an HF directory of its family (safetensors shards,
index, config.json, generation_config.json, tokenizer), streamed one layer at a time, then verified."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import torch

from ..sharding import is_norm_gain
from .ckpt_read import _reader, check_checkpoint, iter_ckpt_rows, read_merged
from .hf_config import hf_config, norm_gain_multiplier
from .names import (DTYPES, VOCAB_TENSORS, ConvertError, VerifyError, _nbytes, _progress, canonical_to_hf, groups,
                    hf_names, hf_shapes, parse_size)
from .safetensors_io import StreamingSafetensorsWriter, _all_written, _Staging, plan_shards
from .tokenizer_export import TokenizerInfo, export_tokenizer_files, inspect_tokenizer, sft_data_tokenizer
from .verify import VERIFY_VOCAB_ROWS, verify


def find_tokenizer(reader, tokenizer: str | Path | None, no_tokenizer: bool,
                   log: Callable[[str], None]) -> tuple[TokenizerInfo | None, str | None]:
    """(the tokenizer whose ids the export states, its path). Looked for in order: ``--tokenizer``;
    the recipe's ``data.tokenizer``; an SFT run's data tokenizer; the ``data.tokenizer`` of the
    phases it started from (``checkpoint.init_from``, back to a from-hf import, which records the
    HF model's tokenizer). None found: refused, naming ``--tokenizer`` and ``--no-tokenizer``
    (weights only; then the ids come from whatever tokenizer the recipes name, or are stated
    absent in one line)."""
    from ..model_card import phases

    recipe = reader.recipe
    m = recipe.model
    if tokenizer is not None:
        return inspect_tokenizer(tokenizer, m.vocab_size), str(tokenizer)
    fix = "pass --tokenizer DIR (the tokenizer the model was trained with), or --no-tokenizer to export the weights only"
    named = recipe.data.tokenizer
    if named is None and recipe.data.kind == "sft":
        try:
            named = sft_data_tokenizer(recipe)
        except ConvertError:
            if not no_tokenizer:
                raise
    if named is None:
        chain, _ = phases(reader.path, reader.meta)
        for p in chain[-2::-1]:  # the parents, newest first
            parent_tok = p.recipe.data.tokenizer if p.recipe else None
            if parent_tok and Path(parent_tok).exists():
                log(f"tokenizer: {parent_tok}, named by the recipe of {p.checkpoint} (this phase started from it)")
                named = parent_tok
                break
    if named is not None and not Path(named).exists():
        if not no_tokenizer:
            raise ConvertError(f"the recipe's tokenizer {named} is not on this machine: {fix}")
        named = None
    if named is None:
        if not no_tokenizer:
            raise ConvertError(f"checkpoint {reader.path} names no tokenizer (no data.tokenizer in its recipe or "
                               f"the phases it started from): {fix}")
        log("note: --no-tokenizer and no tokenizer named by the recipes: config.json and generation_config.json "
            "state no bos/eos/pad ids (null)")
        return None, None
    return inspect_tokenizer(named, m.vocab_size), str(named)


def to_hf(ckpt: str | Path, out: str | Path, dtype: str = "bf16", shard_size: str | int = "5GB",
          tokenizer: str | Path | None = None, overwrite: bool = False, verify_layers: int | None = 2,
          norm_gain_multiplier_: float | None = None, progress: bool = True,
          log: Callable[[str], None] = print, no_tokenizer: bool = False, card: str = "auto",
          command: str | None = None) -> Path:
    """Export a checkpoint (any layout) to an HF directory of its family (families.py). ``verify_layers=None`` skips
    the final check; otherwise the first ``verify_layers`` layers are compared (see :func:`verify`).
    ``norm_gain_multiplier_`` overrides the factor read from the checkpoint's meta.json.
    The tokenizer: :func:`find_tokenizer` (``no_tokenizer``: weights only, ids still stated).
    ``card``: ``auto`` writes the model card README.md (model_card.py), ``none`` skips it;
    ``command`` is the command line it shows (default: the equivalent to-hf command)."""
    from .. import model_card

    if card not in model_card.CARD_CHOICES:
        raise ConvertError(f"--card {card!r}: choose one of {', '.join(model_card.CARD_CHOICES)}")
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    tdtype, max_bytes = DTYPES[dtype], parse_size(shard_size)
    t0 = time.perf_counter()
    reader = _reader(ckpt)
    recipe = reader.recipe
    m = recipe.model
    if m.head == "none":
        raise ConvertError(f"{reader.path} is a headless checkpoint (model.head=none): it has no LM head, and a "
                           "LlamaForCausalLM needs one. Run a hooldown first: train from it with "
                           "checkpoint.init_head=from_embeddings, checkpoint.init_mode=cooldown, model.head=lm, "
                           "train.objective=lm, then export that checkpoint")
    gain = norm_gain_multiplier(reader.meta, recipe) if norm_gain_multiplier_ is None else norm_gain_multiplier_
    where = check_checkpoint(reader, m)
    tok, tok_path = find_tokenizer(reader, tokenizer, no_tokenizer, log)
    config = hf_config(recipe, tdtype, tok.bos_id if tok else None, tok.eos_id if tok else None,
                       tok.pad_id if tok else None)

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
               "eos_token_id": stop if len(stop) > 1 else config["eos_token_id"],
               "pad_token_id": config["pad_token_id"]}
        if "transformers_version" in config:
            gen["transformers_version"] = config["transformers_version"]
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        tok_names = export_tokenizer_files(tok, tmp, m.max_position_embeddings) if tok and not no_tokenizer else []
        if card != "none":
            info = model_card.CardInfo(
                recipe, reader.meta, reader.path, config,
                command or model_card.export_command(reader.path, out, dtype, tokenizer, no_tokenizer), dtype,
                tokenizer=tok_path if tok_names else None,
                pad_token=f"`{tok.pad_token}` (id {tok.pad_id})" if tok and tok.pad_id is not None else None)
            tok_names.append(model_card.write(tmp, info))
        stale = sorted(p.name for p in Path(out).glob("model-*-of-*.safetensors") if p.name not in shard_names)
        staging.commit(shard_names + tok_names + ["config.json", "generation_config.json",
                                                  "model.safetensors.index.json"])
    if stale:
        log(f"note: {out} still holds {', '.join(stale)} from an earlier export; the new index does not "
            "use them (delete them to save space)")
    log(f"wrote {out}: {nshards} shard(s), {total / 1e9:.2f} GB {dtype}, vocab {m.vocab_size} "
        f"(padded {m.padded_vocab_size} in the checkpoint)"
        f"{', tokenizer ' + str(tok_path) if tok and not no_tokenizer else ', no tokenizer files'}"
        f"{', model card README.md' if card != 'none' else ''}"
        f"{f', norm gains x {gain:g}' if gain != 1.0 else ''} in {time.perf_counter() - t0:.1f} s")
    if verify_layers is not None:
        result = verify(reader.path, out, layers=verify_layers, vocab_rows=VERIFY_VOCAB_ROWS,
                        norm_gain_multiplier_=gain)
        log(str(result))
        if not result.ok:
            raise VerifyError(f"the export in {out} does not compute what {reader.path} computes ({result}); "
                              "it is left in place for inspection")
    return Path(out)
