"""from-hf: an HF directory -> a step-0, weights-only checkpoint in our format at a chosen TP x PP
layout (written as checkpoint.save lays one out), plus the recipe.yaml a fine-tune starts from."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint.format import build_meta
from ..config import Recipe
from ..sharding import shard, te_name
from .ckpt_read import _rows_block
from .hf_config import recipe_from_hf_config
from .names import (VOCAB_TENSORS, ConvertError, VerifyError, _describe, _progress, canonical_shapes, family_of,
                    groups, hf_names, hf_shapes, hf_to_canonical, shard_shape, stage_of)
from .safetensors_io import _ST_DTYPE, StreamingSafetensorsWriter, _all_written, _HFFiles, _Staging
from .verify import VERIFY_VOCAB_ROWS, verify


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
