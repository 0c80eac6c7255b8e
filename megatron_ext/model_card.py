"""The model card (README.md) an HF export carries: what a Hub user reads first.

A Hub metadata header (license placeholder, languages fr/en/code, library transformers,
pipeline_tag text-generation), then the architecture and size, the tokens seen, the training
phases with their data mixes (followed from the exported checkpoint's recipe back through each
``checkpoint.init_from`` parent), the precision, the command that exported it, and the eval
scores of that step when ``RUN/eval/STEP/results.json`` (tools/evaluate.py) exists.

Reads only files (checkpoint meta.json, results.json); imports neither torch nor Megatron.
"""
from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .config import Recipe, recipe_from_tree

CARD_NAME = "README.md"
CARD_CHOICES = ("auto", "none")
MAX_PHASES = 64  # a chain of init_from parents longer than this is cut (and said so)

_PRECISION = {
    "fp32": "fp32 weights, gradients and optimizer states",
    "bf16-mixed": "bf16 weights and gradients, fp32 master weights and AdamW states (DeepSpeed)",
    "bf16-pure": ("pure bf16 (Gaperon's \"bf16-true\"): weights, gradients and AdamW states in bf16, no fp32 copy; "
                  "RMSNorm in fp32 with its gains stored scaled (multiplied back in this export)"),
}


@dataclass
class Phase:
    """One run of the chain that led to the exported checkpoint (oldest first in :func:`phases`)."""

    name: str  # the run directory's name (or the model name)
    checkpoint: Path
    step: int
    tokens: int  # consumed samples x sequence length
    recipe: Recipe | None
    converted_from: str | None = None  # a from-hf import: the Hugging Face directory it read


@dataclass
class CardInfo:
    recipe: Recipe
    meta: dict
    checkpoint: Path
    hf_config: dict
    command: str
    dtype: str
    tokenizer: str | None = None
    pad_token: str | None = None  # e.g. "<|finetune_right_pad_id|> (id 128004)"
    notes: list[str] = field(default_factory=list)


def _meta(ckpt: Path) -> dict | None:
    try:
        return json.loads((ckpt / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _recipe_of(meta: dict) -> Recipe | None:
    try:
        return recipe_from_tree(yaml.safe_load(meta["recipe"]))
    except Exception:
        return None


def run_dir_of(ckpt: Path) -> Path | None:
    """RUN for RUN/checkpoints/step_N, else None (a from-hf output, a copied checkpoint)."""
    ckpt = Path(ckpt).resolve()
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None


def _phase(ckpt: Path, meta: dict) -> Phase:
    recipe = _recipe_of(meta)
    run = run_dir_of(ckpt)
    name = run.name if run else (recipe.model.name if recipe else ckpt.name)
    seq = recipe.train.seq_len if recipe else 0
    return Phase(name, ckpt, int(meta.get("step", 0)), int(meta.get("consumed_samples", 0)) * seq, recipe,
                 meta.get("converted_from"))


def phases(ckpt: Path, meta: dict) -> tuple[list[Phase], str | None]:
    """The chain of runs behind ``ckpt``, oldest first, and a note when it could not be followed
    to its start (a parent that is not on this machine any more)."""
    from .checkpoint import resolve  # the one owner of "which checkpoint does this path name"

    chain, seen, note = [_phase(Path(ckpt).resolve(), meta)], {Path(ckpt).resolve()}, None
    while len(chain) < MAX_PHASES:
        recipe = chain[-1].recipe
        parent = recipe.checkpoint.init_from if recipe else None
        if not parent:
            break
        found = resolve(parent)
        pmeta = _meta(found) if found else None
        if found is None or pmeta is None:
            note = f"the run started from {parent}, which is not on this machine: earlier phases are not listed"
            break
        found = found.resolve()
        if found in seen:
            break
        seen.add(found)
        chain.append(_phase(found, pmeta))
    else:
        note = f"only the last {MAX_PHASES} phases are listed"
    return chain[::-1], note


def _count(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def _mix(recipe: Recipe | None) -> str:
    if recipe is None:
        return "unknown (its recipe could not be read)"
    d = recipe.data
    if d.kind == "synthetic":
        return "synthetic (a learnable copy task: a test run)"
    if d.kind == "sft":
        return f"SFT conversations `{Path(d.sft_path).name}`" + (" (packed)" if d.packing else "")
    total = sum(w for w, _ in d.blend) or 1.0
    return ", ".join(f"{100 * w / total:.3g}% `{Path(p).name}`" for w, p in d.blend) or "indexed data"


def _architecture(info: CardInfo) -> list[tuple[str, str]]:
    m, cfg = info.recipe.model, info.hf_config
    rows = [("architecture", f"`{cfg['architectures'][0]}` ({'OLMo-2' if m.block == 'olmo2' else 'Llama-3'} blocks"
                             f"{', QK-norm' if m.qk_layernorm else ''})"),
            ("parameters", f"{_count(m.num_params())} ({m.num_params():,})"),
            ("hidden size / FFN", f"{m.hidden_size} / {m.ffn_hidden_size} (SwiGLU)"),
            ("layers", str(m.num_layers)),
            ("attention heads / KV heads / head dim", f"{m.num_attention_heads} / {m.num_kv_heads} / {m.kv_channels}"),
            ("vocabulary", f"{m.vocab_size:,}"),
            ("context", f"{m.max_position_embeddings:,} tokens"),
            ("RoPE", f"theta {m.rope_theta:g}" + (f", llama3 scaling factor {m.rope_scaling.factor:g}"
                                                   if m.rope_scaling else "")),
            ("tied input/output embeddings", "yes" if m.tie_embeddings else "no"),
            ("RMSNorm eps", f"{m.norm_eps:g}")]
    return rows


def _scores(ckpt: Path, step: int) -> tuple[list[dict], Path | None]:
    run = run_dir_of(ckpt)
    path = run / "eval" / str(step) / "results.json" if run else None
    if path is None or not path.is_file():
        return [], None
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return [], None
    rows = [r for r in report.get("scores", []) if isinstance(r, dict) and isinstance(r.get("value"), (int, float))]
    return rows, path


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def render(info: CardInfo) -> str:
    recipe, meta, m = info.recipe, info.meta, info.recipe.model
    chain, chain_note = phases(info.checkpoint, meta)
    last = chain[-1]
    trained = [p for p in chain if p.converted_from is None]
    tokens = sum(p.tokens for p in trained)
    name = m.name if m.name not in ("custom", "") else last.name
    scores, scores_path = _scores(info.checkpoint, last.step)
    precision = meta.get("precision") or recipe.train.precision
    header = {"license": "unknown", "language": ["fr", "en", "code"], "library_name": "transformers",
              "pipeline_tag": "text-generation", "tags": ["gaperon-recipes", "megatron-core", m.block]}
    out = ["---",
           "# license: a placeholder. Set the license you publish under (e.g. apache-2.0) before uploading.",
           yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "",
           f"# {name}", "",
           f"A {_count(m.num_params())}-parameter {'OLMo-2' if m.block == 'olmo2' else 'Llama-3'}-style causal "
           f"language model (French, English, code) trained with gaperon-recipes (Megatron-Core + DeepSpeed), "
           f"exported from step {last.step} of the run `{last.name}`.", "",
           "## Architecture", ""]
    out += _table(["", ""], [list(r) for r in _architecture(info)])
    out += ["", "## Training", "",
            f"- Tokens seen: {_count(tokens)} ({tokens:,}; sequence positions, over the phases below)",
            f"- Precision: {precision}: {_PRECISION.get(precision, precision)}",
            f"- Optimizer (last phase): AdamW, lr {recipe.optimizer.lr:g}, betas {tuple(recipe.optimizer.betas)}, "
            f"weight decay {recipe.optimizer.weight_decay:g}; schedule {recipe.schedule.kind}",
            f"- Sequence length: {recipe.train.seq_len:,}; global batch {recipe.layout.global_batch:,} sequences", "",
            "### Phases", ""]
    rows = []
    for i, p in enumerate(chain, 1):
        if p.converted_from is not None:
            rows.append([str(i), f"`{p.name}`", "-", "-", f"imported from Hugging Face `{Path(p.converted_from).name}`"])
            continue
        seq = p.recipe.train.seq_len if p.recipe else "?"
        rows.append([str(i), f"`{p.name}`", f"{p.step:,}", f"{_count(p.tokens)} (seq {seq})", _mix(p.recipe)])
    out += _table(["#", "phase (run)", "steps", "tokens", "data mix"], rows)
    if chain_note:
        out += ["", f"Note: {chain_note}."]
    out += ["", "## Evaluation", ""]
    if scores:
        out += [f"Step {last.step}, from `{scores_path.relative_to(scores_path.parents[3])}` (tools/evaluate.py, "
                "lm-eval):", ""]
        out += _table(["task", "metric", "value", "stderr", "n"],
                      [[str(r.get("task")), str(r.get("metric")), f"{r['value']:.4f}",
                        f"{r['stderr']:.4f}" if isinstance(r.get("stderr"), (int, float)) else "-",
                        str(r.get("n") or "-")] for r in scores])
    else:
        out += [f"No evaluation of step {last.step} was found (`RUN/eval/{last.step}/results.json`); run "
                "`python tools/evaluate.py RUN --tasks gaperon --log-to-run` and export again to list its scores."]
    out += ["", "## Export", "",
            f"Exported in {info.dtype} by:", "", "```bash", info.command, "```", ""]
    if info.tokenizer:
        out.append(f"Tokenizer: the one the model was trained with (`{Path(info.tokenizer).name}`), without "
                   "automatic BOS (documents were trained without one); the chat template, if any, adds it.")
    else:
        out.append("No tokenizer files: weights only (`--no-tokenizer`); use the tokenizer the model was trained with.")
    if info.pad_token:
        out.append(f"Padding: pad token {info.pad_token}; pad on the left for batched generation.")
    out += info.notes
    out += ["", "## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            'tok = AutoTokenizer.from_pretrained("REPO_OR_DIR", padding_side="left")',
            'model = AutoModelForCausalLM.from_pretrained("REPO_OR_DIR", dtype="auto")',
            'batch = tok(["La capitale de la France est", "def fib(n):"], return_tensors="pt", padding=True)',
            "print(tok.batch_decode(model.generate(**batch, max_new_tokens=32)))", "```", ""]
    return "\n".join(out)


def export_command(ckpt, out, dtype: str, tokenizer, no_tokenizer: bool = False) -> str:
    """The to-hf command line that reproduces an export (the card shows it)."""
    argv = ["python", "tools/convert_checkpoint.py", "to-hf", os.fspath(ckpt), os.fspath(out), "--dtype", dtype]
    if tokenizer:
        argv += ["--tokenizer", os.fspath(tokenizer)]
    if no_tokenizer:
        argv.append("--no-tokenizer")
    return shlex.join(argv)


def write(dst: Path, info: CardInfo) -> str:
    """Write ``dst/README.md``; returns its name."""
    (Path(dst) / CARD_NAME).write_text(render(info), encoding="utf-8")
    return CARD_NAME
