"""config.json <-> recipe: the HF config of a recipe's model (its family's), Llama-3.1 rope scaling
both ways, the recipe an HF config.json describes, and the norm-gain factor a checkpoint states."""
from __future__ import annotations

import torch

from ..checkpoint.format import norm_gain_scale
from ..config import ModelConfig, Recipe, RecipeError, recipe_from_tree
from .families import FAMILIES
from .names import ConvertError, family_of


_HF_DTYPE_NAME = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def norm_gain_multiplier(meta: dict, recipe: Recipe | None = None) -> float:
    """What the stored norm gains must be multiplied by to get the model's true gains.

    Pure-bf16 training keeps the gains divided by a factor (Gaperon used 20; see model.RMSNorm)
    so that small Adam updates survive bf16 rounding near 1.0. Every checkpoint states its factor
    in ``meta.json`` under ``norm_gain_scale``; absent (older checkpoints), the gains are plain."""
    return norm_gain_scale(meta)


def hf_config(recipe: Recipe, dtype: torch.dtype = torch.bfloat16, bos_token_id: int | None = None,
              eos_token_id: int | None = None) -> dict:
    """config.json of the HF equivalent of ``recipe.model`` (its family's, see families.py).

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
