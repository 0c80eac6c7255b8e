"""Typed recipes: YAML -> validated Recipe, with dotted command-line overrides.

A recipe may name a ``base`` recipe (a path relative to itself) that it deep-merges over, so
phase and SFT recipes only state what differs from the size recipe they start from. Every
invalid combination is rejected here, at load time, with one message that names the fix: a bad
layout should cost a second on a laptop, not an allocation on a cluster.
"""
from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator, model_validator

from .errors import RecipeError
from .recipe_checks import injection_problems, recipe_problems, settings_problems, shape_problems  # noqa: F401
from .recipe_yaml import (_deep_merge, apply_overrides, base_chain, parse_yaml, read_yaml_tree,  # noqa: F401
                          _read_mapping)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


class RopeScalingConfig(_Strict):
    """Llama-3.1's RoPE frequency scaling (HF ``rope_type: llama3``). Rotary wavelengths shorter
    than ``original_max_position_embeddings / high_freq_factor`` are kept, those longer than
    ``original_max_position_embeddings / low_freq_factor`` are stretched ``factor`` times, and the
    band between is interpolated smoothly. Llama-3.1: factor 8, low 1, high 4, original 8192;
    Llama-3.2 1B/3B: factor 32. See model.llama3_inv_freq."""

    type: Literal["llama3"] = "llama3"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @model_validator(mode="after")
    def _check(self) -> "RopeScalingConfig":
        if not (math.isfinite(self.factor) and self.factor >= 1.0):
            raise RecipeError(f"model.rope_scaling.factor={self.factor} must be a finite number >= 1 "
                              "(Llama-3.1 uses 8, Llama-3.2 1B/3B 32)")
        if not (0 < self.low_freq_factor < self.high_freq_factor and math.isfinite(self.high_freq_factor)):
            raise RecipeError(f"model.rope_scaling: low_freq_factor={self.low_freq_factor} and high_freq_factor="
                              f"{self.high_freq_factor} must satisfy 0 < low < high (Llama-3.1 uses 1 and 4)")
        if self.original_max_position_embeddings < 1:
            raise RecipeError(f"model.rope_scaling.original_max_position_embeddings="
                              f"{self.original_max_position_embeddings} must be >= 1 (Llama-3.1 uses 8192)")
        return self


class ModelConfig(_Strict):
    """Llama-3 shapes. ``vocab_size`` is the tokenizer's; the embedding is padded to a multiple of
    ``vocab_pad_multiple`` (fixed, so the padded size never depends on the TP degree)."""

    name: str = "custom"
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: Optional[int] = None
    ffn_hidden_size: int
    vocab_size: int = 128256
    vocab_pad_multiple: int = 128
    max_position_embeddings: int = 4096
    rope_theta: float = 500000.0
    rope_scaling: Optional[RopeScalingConfig] = None  # null: plain RoPE (Gaperon); llama3: Llama-3.1/3.2
    norm_eps: float = 1e-5
    qk_layernorm: bool = False
    # llama: pre-norm blocks. olmo2 (Gaperon-24B's published blocks): no pre-norms, RMSNorm on the
    # outputs of attention and MLP before each residual add, QK-norm over the whole q and k projections.
    block: Literal["llama", "olmo2"] = "llama"
    init_std: float = 0.02
    # lm: the output layer (LM head). none: headless (train.objective=cwt): no output layer at all;
    # the final hidden states are scored against the input embeddings (megatron_ext/cwt_loss.py).
    head: Literal["lm", "none"] = "lm"
    # Tied input/output embeddings (Llama-3.2 1B/3B, SmolLM, small Qwen): the LM head is the input
    # embedding. Under pipeline parallelism the last stage keeps a copy that Megatron-Core's
    # embedding group keeps equal (the engine all-reduces its gradient with the first stage's).
    tie_embeddings: bool = False

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_pad_multiple
        return int(math.ceil(self.vocab_size / m) * m)

    def num_params(self) -> int:
        """Exact parameter count of the Llama block stack (unpadded vocab; the head counted once
        more unless tied)."""
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.kv_channels
        q, kv = self.num_attention_heads * d, self.num_kv_heads * d
        attn = h * (q + 2 * kv) + q * h
        mlp = 3 * h * f
        norms = 2 * h + (2 * d if self.qk_layernorm else 0) + (q + kv if self.block == "olmo2" else 0)
        tables = 1 if self.tie_embeddings or self.head == "none" else 2  # input embedding (+ output layer)
        return self.num_layers * (attn + mlp + norms) + tables * self.vocab_size * h + h


class LayoutConfig(_Strict):
    """How the model is split: tp x pp x dp ranks, ZeRO stage, batches, recompute."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 1
    micro_batch: int = 1
    global_batch: int = 1
    recompute: Literal["none", "selective", "full"] = "none"

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def num_microbatches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)


class OptimizerConfig(_Strict):
    lr: float = 3e-4
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    @field_validator("betas", mode="before")
    @classmethod
    def _check_betas(cls, value):
        if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_is_number, value))):
            raise RecipeError(f"optimizer.betas={value!r} must be two numbers [beta1, beta2] in [0, 1), "
                              "e.g. [0.9, 0.95]")
        return value


class ScheduleConfig(_Strict):
    """LR schedule, a pure function of the step (nothing to checkpoint).

    cosine: linear warmup then cosine to min_lr at ``train.steps``.
    wsd: linear warmup, constant, then a linear (or cosine) decay to min_lr over ``decay_steps``.
    constant: linear warmup then constant.
    """

    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 0
    decay_steps: int = 0
    decay_shape: Literal["linear", "cosine"] = "linear"


ATTENTION_CHOICES = ("auto", "te", "sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math",
                     "flash-attn", "unfused")


class TrainConfig(_Strict):
    """How to train.

    precision: ``fp32``; ``bf16-mixed`` (bf16 compute, fp32 master weights and Adam states);
    ``bf16-pure`` (Gaperon's "bf16-true": weights, gradients and Adam states all bf16, no fp32
    copy; RMSNorm gains stored divided by ``norm_gain_scale``, see model.RMSNorm).
    attention: ``auto`` (Transformer Engine on GPU when installed, else sdpa); ``te``; ``sdpa``
    (torch picks the kernel); ``sdpa-flash`` / ``sdpa-cudnn`` / ``sdpa-efficient`` / ``sdpa-math``
    (torch SDPA restricted to that kernel); ``flash-attn`` (the flash_attn package: FA3's
    flash_attn_interface when installed, else FA2); ``unfused`` (Megatron's reference attention).
    compile: torch.compile each transformer layer (GPU; slow to start on CPU).
    packed_attention: how packed SFT rows keep conversations apart: ``varlen`` (boundaries as
    cu_seqlens, megatron_ext/attention.py; any attention but ``unfused``) or ``dense`` (the
    reference [b, 1, s, s] block mask; sdpa kernels only).
    lm_head_grad_interval: every N steps log the gradient norm reaching the logits and the final
    hidden states, and their ratio (0: off, no hooks at all).
    loss_chunk_tokens: compute the output layer and its cross entropy this many tokens at a time,
    so no [tokens, vocab] logits are kept for backward (megatron_ext/lm_loss.py; 0: Megatron's path).
    objective: ``lm`` (cross entropy over the vocabulary, through the LM head) or ``cwt`` (headless
    pretraining, Godey et al. 2024: contrastive weight tying against the input embeddings of the
    micro batch's targets; needs model.head=none; megatron_ext/cwt_loss.py). cwt_temperature: the
    scores h . e are divided by it (gapetron's default 1).
    """

    steps: int = 10
    seq_len: int = 128
    seed: int = 1234
    precision: Literal["fp32", "bf16-mixed", "bf16-pure"] = "bf16-mixed"
    norm_gain_scale: float = 20.0
    attention: Literal[ATTENTION_CHOICES] = "auto"
    compile: bool = False
    packed_attention: Literal["varlen", "dense"] = "varlen"
    lm_head_grad_interval: int = 0
    loss_chunk_tokens: int = 0
    objective: Literal["lm", "cwt"] = "lm"
    cwt_temperature: float = 1.0

    @property
    def stored_gain_scale(self) -> float:
        """Stored RMSNorm gains x this = the true gains: ``norm_gain_scale`` under bf16-pure, else 1."""
        return self.norm_gain_scale if self.precision == "bf16-pure" else 1.0
    log_interval: int = 1
    eval_interval: int = 0
    eval_iters: int = 2
    output_dir: str = "runs/default"
    tensorboard: bool = True


class DataConfig(_Strict):
    """Where samples come from. ``synthetic`` needs nothing on disk (a learnable copy task).

    ``sft``: conversations prepared by tools/prepare_sft.py in ``sft_path`` (see megatron_ext/sft.py).
    ``packing`` puts several conversations in one sequence (block-diagonal attention); ``epochs``
    replaces a step count: train.steps is then derived from the data (packing.steps_for_epochs).
    """

    kind: Literal["synthetic", "indexed", "sft"] = "synthetic"
    blend: list[tuple[float, str]] = []
    valid_blend: list[tuple[float, str]] = []
    split: str = "98,2,0"
    tokenizer: Optional[str] = None
    cache_dir: Optional[str] = None
    sft_path: Optional[str] = None
    sft_valid_path: Optional[str] = None
    packing: bool = True
    epochs: Optional[int] = None

    @field_validator("blend", "valid_blend", mode="before")
    @classmethod
    def _check_blend(cls, value, info):
        key = f"data.{info.field_name}"
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{key}={value!r} must be a list of [weight, path-prefix] pairs, e.g. "
                              "[[0.7, /data/en_text_document], [0.3, /data/fr_text_document]]")
        for k, entry in enumerate(value):
            if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and _is_number(entry[0])
                    and isinstance(entry[1], str) and entry[1].strip()):
                raise RecipeError(f"{key}[{k}]={entry!r} is not a [weight, path-prefix] pair: write it as "
                                  "[0.5, /path/to/name_text_document]")
            if not (math.isfinite(entry[0]) and entry[0] >= 0):
                raise RecipeError(f"{key}[{k}] has weight {entry[0]}: blend weights must be finite and >= 0 "
                                  "(they are normalised to sum to 1)")
        if value and not sum(entry[0] for entry in value) > 0:
            raise RecipeError(f"{key} weights are all 0: give at least one dataset a positive weight")
        return value

    @field_validator("split")
    @classmethod
    def _check_split(cls, value: str) -> str:
        if split_fractions(value) is None:
            raise RecipeError(f"data.split={value!r} must be three non-negative numbers train,valid,test with a "
                              'positive sum, e.g. "98,2,0"')
        return value

    @model_validator(mode="after")
    def _check_sft(self) -> "DataConfig":
        if self.kind == "sft" and not self.sft_path:
            raise RecipeError("data.kind=sft needs data.sft_path: a directory written by tools/prepare_sft.py")
        if self.epochs is not None and self.epochs < 1:
            raise RecipeError(f"data.epochs={self.epochs} must be >= 1 (or null to train for train.steps)")
        if self.epochs is not None and self.kind != "sft":
            raise RecipeError("data.epochs is only used with data.kind=sft; set train.steps instead")
        return self


def split_fractions(split: str) -> Optional[tuple[float, float, float]]:
    """``data.split`` ("98,2,0", also "98/2/0") as three numbers; None when it is not three
    non-negative numbers with a positive sum."""
    parts = re.split(r"\s*[,/]\s*", str(split).strip())
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        return None
    if len(values) != 3 or not all(math.isfinite(v) and v >= 0 for v in values) or not sum(values) > 0:
        return None
    return values


# Model fields that change what trained weights compute without changing any tensor's shape: a
# phase started from a checkpoint, or a run resumed from its own, keeps them, unless
# checkpoint.init_allow_changes names them.
FUNCTION_KEYS = ("rope_theta", "rope_scaling", "norm_eps", "max_position_embeddings")


# What each checkpoint.init_mode keeps of its parent (see CheckpointConfig); the load code and
# the README's table read this one place.
INIT_MODES = ("model", "model+data", "model+optimizer", "model+optimizer+data", "model+optimizer+lr",
              "cooldown", "continue")
KEEPS = {  # mode: (optimizer, data position, step, RNG streams)
    "model": (False, False, False, False),
    "model+data": (False, True, False, False),
    "model+optimizer": (True, False, False, False),
    "model+optimizer+data": (True, True, False, False),
    "model+optimizer+lr": (True, False, True, False),
    "cooldown": (True, True, True, True),
    "continue": (True, True, True, True),
}
GAPETRON_LOAD_MODES = {"model": "model_only", "model+data": "model_data", "model+optimizer": "transfer",
                       "model+optimizer+data": "model_opt_data", "model+optimizer+lr": "transfer_with_lr",
                       "cooldown": "cooldown", "continue": "continue"}


class CheckpointConfig(_Strict):
    """Saving, rotation, resume and phase chaining.

    A run restarted with the same output_dir resumes from its own latest checkpoint. Otherwise,
    ``init_from`` (a checkpoint dir or a run's checkpoints dir) starts this phase from a parent;
    ``init_mode`` says what of the parent it keeps (gapetron's --load_mode names in brackets):

    ==================== ======= ========= =========== ====== =====================
    init_mode            weights Adam      data pos.   step   RNG streams
    ==================== ======= ========= =========== ====== =====================
    model                kept    fresh     restart     0      fresh  (model_only)
    model+data           kept    fresh     kept        0      fresh  (model_data)
    model+optimizer      kept    kept      restart     0      fresh  (transfer)
    model+optimizer+data kept    kept      kept        0      fresh  (model_opt_data)
    model+optimizer+lr   kept    kept      restart     kept   fresh  (transfer_with_lr)
    cooldown             kept    kept      kept        kept   kept   (cooldown)
    continue             kept    kept      kept        kept   kept   (continue)
    ==================== ======= ========= =========== ====== =====================

    "step kept": the schedule continues from the parent's step and train.steps counts from the
    start of the parent's run (the total). ``cooldown`` is the WSD branch-off: this recipe's
    schedule must be wsd and its decay (the last schedule.decay_steps of train.steps) must start at
    or after the parent's step. ``continue`` requires the parent's schedule unchanged (a new one
    is a cooldown). ``init_head: from_embeddings`` (the "hooldown"): the parent is headless
    (model.head=none) and this model's LM head starts as an exact copy of the input embeddings;
    its Adam moments start at zero, the other tensors' follow init_mode. The parent's model
    section must match this recipe's in every field of FUNCTION_KEYS, except those listed in
    ``init_allow_changes`` (a deliberate change, e.g. a context extension: rope_scaling,
    max_position_embeddings, rope_theta). A resume of the run's own checkpoint is held to the same
    rule (a requeued job re-reads a recipe file that may have been edited since).
    ``async_save``: training pauses only to copy each rank's share to host memory; a background
    thread writes it, and the checkpoint is committed (``latest`` moved) at the first step
    boundary where every rank has written its files.
    """

    interval: int = 0  # save every N steps (0: only at the end and on signals)
    keep_last: int = 2
    keep_every: int = 0  # also keep every M-th step forever (0: none)
    save_at_end: bool = True
    async_save: Optional[bool] = None  # write in a background thread (null: on GPU yes, on CPU no)
    init_from: Optional[str] = None
    init_mode: Literal[INIT_MODES] = "model"
    init_head: Optional[Literal["from_embeddings"]] = None
    init_allow_changes: list[Literal[FUNCTION_KEYS]] = []


class HealthConfig(_Strict):
    """What to do with a non-finite loss or gradient norm: skip the batch, and stop after too many
    in a row. ``hang_timeout_s``: a rank with no training step finished for that long dumps its
    stacks and exits 86 (the job restarts from its last checkpoint); null: ten planned step
    times, at least 300 s; 0: off (see watchdog.py). ``straggler_ratio``: the step line names the
    slowest rank once its step time has been over this multiple of the median for
    ``straggler_intervals`` log intervals in a row (0: no straggler report; see straggler.py)."""

    on_nonfinite: Literal["skip", "stop"] = "skip"
    max_consecutive_skips: int = 5
    hang_timeout_s: Optional[float] = None
    straggler_ratio: float = 1.2
    straggler_intervals: int = 3

    @model_validator(mode="after")
    def _check_straggler(self) -> "HealthConfig":
        if self.straggler_ratio != 0 and not self.straggler_ratio > 1:
            raise RecipeError(f"health.straggler_ratio={self.straggler_ratio} must be > 1 (a multiple of the median "
                              "step time, e.g. 1.2) or 0 (no straggler report)")
        if self.straggler_intervals < 1:
            raise RecipeError(f"health.straggler_intervals={self.straggler_intervals} must be >= 1: log intervals "
                              "in a row above straggler_ratio before the step line names the rank")
        return self


class InjectionConfig(_Strict):
    """Controlled document injection for memorisation / poisoning research (megatron_ext/inject.py).
    Off by default. Documents: ``documents`` (a JSONL file, key "text"), ``texts`` (inline), or
    ``token_ids`` (id lists; the only kind synthetic data, which has no tokenizer, accepts). Where:
    ``rate`` (that fraction of the train samples in [start_sample, end_sample), drawn with ``seed``)
    or ``positions`` (global sample indices). ``<output_dir>/<record>`` lists every placement."""

    enabled: bool = False
    documents: Optional[str] = None
    texts: list[str] = []
    token_ids: list[list[int]] = []
    rate: Optional[float] = None
    positions: list[int] = []
    seed: int = 0
    start_sample: int = 0
    end_sample: Optional[int] = None  # null: the run's last sample (pin it to extend train.steps later)
    record: str = "injections.jsonl"

    def window(self, total_samples: int) -> tuple[int, int]:
        return self.start_sample, total_samples if self.end_sample is None else self.end_sample

    def count(self, total_samples: int) -> int:
        if self.positions:
            return len(self.positions)
        start, end = self.window(total_samples)
        return round(self.rate * (end - start))


class EvalConfig(_Strict):
    """In-loop downstream evals (megatron_ext/downstream.py): lm-eval multiple-choice tasks (the
    shipped ``gaperon_demo_cloze``, or any whose data is on disk) scored by the training model
    itself, every ``interval`` steps and at the last step (0: the last step only), on the first
    ``limit`` documents of each task, ``micro_batch`` (context, choice) rows per forward pass.
    Offline evals of exports: tools/evaluate.py."""

    downstream: list[str] = []
    interval: int = 0
    limit: int = 200
    micro_batch: int = 16


class Recipe(_Strict):
    model: ModelConfig
    layout: LayoutConfig = LayoutConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    health: HealthConfig = HealthConfig()
    injection: InjectionConfig = InjectionConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "Recipe":
        written = bool(info.context and info.context.get("written"))
        for problem in (settings_problems(self) if written else []) + recipe_problems(self):
            raise RecipeError(problem)
        return self


def validation_message(err: ValidationError, root: str = "recipe", schema: str = "megatron_ext/config.py",
                       own_error: type = RecipeError, who_sets: str = "the recipe (or its base)") -> str:
    """Pydantic's errors as one line: the dotted key, its value and what is wrong; our own
    checks' messages (``own_error`` raised in a validator) as they are."""
    lines = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or root
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{where}': check its spelling against {schema}")
        elif e["type"] == "missing":
            lines.append(f"missing key '{where}': {who_sets} must set it")
        elif e["type"] == "value_error" and isinstance(e.get("ctx", {}).get("error"), own_error):
            lines.append(str(e["ctx"]["error"]))
        else:
            value = repr(e.get("input"))
            value = value if len(value) <= 60 else value[:57] + "..."
            lines.append(f"{where}={value}: {e['msg']}")
    return "; ".join(lines)


def recipe_from_tree(tree: dict, written: bool = False) -> Recipe:
    """Validate a recipe tree. ``written``: it is what someone wrote for a run to come (a recipe
    file with its overrides), so settings_problems apply too; leave it off for recipes read back
    from checkpoints."""
    try:
        return Recipe.model_validate(tree, context={"written": written})
    except ValidationError as err:
        raise RecipeError(validation_message(err)) from None


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Load, merge, override and validate a recipe. Raises RecipeError with one clear message."""
    tree = apply_overrides(read_yaml_tree(path), list(overrides))
    return derive_sft_steps(recipe_from_tree(tree, written=True), tree)


def derive_sft_steps(recipe: Recipe, tree: dict) -> Recipe:
    """SFT recipes count epochs, not steps: with data.kind=sft and data.epochs set, train.steps
    becomes ceil(epochs x sequences per epoch / layout.global_batch), computed from the prepared
    data (megatron_ext/packing.py). Left as written when that data is not on this machine yet (the
    training run then stops at the data with a message saying how to prepare it)."""
    d = recipe.data
    if d.kind != "sft" or d.epochs is None or not (Path(d.sft_path) / "meta.json").is_file():
        return recipe
    from .packing import SFTDataError, steps_for_epochs  # numpy only: nothing above the schema

    try:
        steps = steps_for_epochs(d.sft_path, recipe.train.seq_len, recipe.train.seed, d.packing, d.epochs,
                                 recipe.layout.global_batch)
    except SFTDataError as err:
        raise RecipeError(str(err)) from None
    tree = copy.deepcopy(tree)
    tree.setdefault("train", {})["steps"] = steps
    return recipe_from_tree(tree, written=True)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
