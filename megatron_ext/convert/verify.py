"""verify: the checkpoint's Megatron model (tp=pp=dp=1, fp32, CPU) and the HF model run on the same
random sequences; their logits (and the vocab matrices, in full) compared."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import recipe_from_tree
from ..errors import free_port
from ..sharding import is_norm_gain, local_name
from .ckpt_read import _reader, check_checkpoint, iter_ckpt_rows, read_ckpt_rows
from .hf_config import norm_gain_multiplier
from .names import VOCAB_TENSORS, ConvertError, hf_names, hf_shapes, vocab_tensors
from .safetensors_io import _HFFiles


VERIFY_VOCAB_ROWS = 4096  # logits compared on this many vocab rows by the post-export check


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
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for name in model.state_dict():
        rows = (0, vocab_rows) if name in ("model.embed_tokens.weight", "lm_head.weight") else None
        src = "model.embed_tokens.weight" if tied and name == "lm_head.weight" else name
        sd[name] = files.get(src, rows).float()
    model.load_state_dict(sd, strict=True, assign=True)
    for mod_name, mod in list(model.named_modules()):  # non-persistent buffers (rotary inv_freq)
        if any(b.is_meta for b in mod.buffers(recurse=False)):
            parent = model.get_submodule(mod_name.rsplit(".", 1)[0]) if "." in mod_name else model
            setattr(parent, mod_name.rsplit(".", 1)[-1], type(mod)(config=cfg))
    if tied:
        model.tie_weights()  # load_state_dict(assign=True) gave lm_head a tensor of its own
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
    for n in vocab_tensors(m):
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
    from ..engine import init_distributed
    from ..model import build_model, canonical_names

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
