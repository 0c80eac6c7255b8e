"""The optimizer's view of a parameter: the Adam states DeepSpeed keeps (ZeRO-1/2 fragments,
ZeRO-3 partitions, or replicated without ZeRO), which share of them a rank writes, how a rank
sets its share on load, and the RNG streams."""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.distributed as dist

from ..sharding import is_norm_gain
from .format import CheckpointError
from .owners import even_range, replicated_ranges, zero3_range  # noqa: F401  (even_range: re-exported)


def _base_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.ds.optimizer
    while hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def _plain(engine) -> bool:
    """No ZeRO / bf16 wrapper: parameters are their own master copies."""
    return engine.ds.optimizer is _base_optimizer(engine)


def _optimized_tensors(engine) -> list[torch.Tensor]:
    """The tensors the base optimizer keeps states for: ZeRO's flat fp32 partitions, or the
    parameters themselves without a DeepSpeed wrapper."""
    wrapper = engine.ds.optimizer
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        flats = getattr(wrapper, attr, None)
        if flats:
            return list(flats)
    return [p for g in _base_optimizer(engine).param_groups for p in g["params"]]


def ensure_optimizer_states(engine) -> None:
    """Create zero Adam states where none exist yet (a fresh optimizer), so that loading has
    somewhere to write. Mirrors what torch's AdamW creates on its first step."""
    opt = _base_optimizer(engine)
    on_device = any(g.get("fused") or g.get("capturable") for g in opt.param_groups)
    for p in _optimized_tensors(engine):
        if not opt.state.get(p):
            opt.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def relink_optimizer_states(engine) -> None:
    """Point every parameter's ZeRO/bf16 fragment map at its Adam states.

    DeepSpeed links them once, right after the first parameter group's first step, so the
    parameters of later groups (ours: the no-weight-decay group) stay unlinked. Linking again
    is cheap (views) and makes safe_get/set_full_optimizer_state work for every parameter."""
    opt = engine.ds.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _replicated_states(engine, param) -> dict:
    """AdamW's state table, for a parameter that no ZeRO stage partitions (no DeepSpeed wrapper:
    the parameter is its own master copy); anything else here is a bug, not a checkpoint to
    write or load without its moments."""
    if not _plain(engine):
        raise CheckpointError(f"internal error: a parameter of shape {tuple(param.shape)} has neither a ZeRO "
                              "partition nor replicated states")
    return _base_optimizer(engine).state


def _get_states(engine, param) -> dict[str, torch.Tensor | None]:
    """Master weight and Adam moments of this rank's TP shard where they are not ZeRO-partitioned."""
    st = _replicated_states(engine, param).get(param, {})
    return {"model": param.detach(), "exp_avg": st.get("exp_avg"), "exp_avg_sq": st.get("exp_avg_sq")}


def _zero3_range(param) -> tuple[int, int, int]:
    """ZeRO-3: this rank's [lo, hi) of ``param`` and its partition size (:func:`.owners.zero3_range`),
    checked against the partition DeepSpeed actually holds."""
    group = param.ds_process_group
    lo, hi, size = zero3_range(param.ds_numel, dist.get_rank(group=group), dist.get_world_size(group=group))
    if size != param.ds_tensor.ds_numel:
        raise CheckpointError(f"internal error: DeepSpeed's ZeRO-3 partition of a {param.ds_numel}-element "
                              f"parameter has {param.ds_tensor.ds_numel} elements, owners.zero3_range says {size}")
    return lo, hi, size


def _adam_step(engine) -> int:
    for st in _base_optimizer(engine).state.values():
        if "step" in st:
            return int(st["step"])
    return 0


def _rng_state() -> dict:
    """This rank's RNG streams as tensors, ints and strings only: loadable with weights_only=True."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


_ABSENT = object()


def replicated_shares(engine, dp_rank: int, dp_size: int) -> dict[int, tuple[int, int]]:
    """Without ZeRO: which flat range of each parameter (by ``id``) this DP rank writes
    (:func:`.owners.replicated_ranges` over the stage's parameters, end to end)."""
    params = [p for chunk in engine.chunks for p in chunk.parameters()]
    return {id(p): r for p, r in zip(params, replicated_ranges([p.numel() for p in params], dp_rank, dp_size))}


def _owned(engine, param, lo: int, hi: int) -> dict[str, torch.Tensor]:
    """The master weight and Adam moments over elements [lo, hi) of this rank's TP shard of
    ``param``, the range :func:`.owners.owned_ranges` gives this DP rank. Under ZeRO-1/2 those are
    views of DeepSpeed's own partition (no copy, no collective), and DeepSpeed's fragment
    (``param._hp_mapping``) must be that range; under ZeRO-3 views of the parameter's own
    partition, padding trimmed (see :func:`_zero3_range`); without ZeRO the states are
    replicated and each DP rank takes its range (:func:`.owners.replicated_ranges`)."""
    if hasattr(param, "ds_id"):  # ZeRO-3
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        z_lo, z_hi, _ = _zero3_range(param)
        _agree(param, (lo, hi), (z_lo, z_hi))
        out = {"model": safe_get_local_fp32_param(param)}
        for kind in ("exp_avg", "exp_avg_sq"):
            try:
                out[kind] = safe_get_local_optimizer_state(param, kind)
            except KeyError:  # no optimizer state yet
                pass
        return {k: t[:hi - lo] for k, t in out.items() if t is not None} if hi > lo else {}
    mapping = getattr(param, "_hp_mapping", _ABSENT)
    if mapping is not _ABSENT:
        _agree(param, (lo, hi), _fragment(mapping))
        if mapping is None:  # none of this parameter lies in this rank's partition
            return {}
        out = {"model": mapping.get_hp_fragment()}
        for kind in ("exp_avg", "exp_avg_sq"):
            try:
                out[kind] = mapping.get_hp_fragment(kind)
            except (KeyError, ValueError, TypeError):  # no optimizer state yet
                pass
        return out
    if lo == hi:
        return {}
    return {k: t.reshape(-1)[lo:hi] for k, t in _get_states(engine, param).items() if t is not None}


def _fragment(mapping) -> tuple[int, int]:
    """DeepSpeed's ZeRO-1/2 fragment of a parameter as [lo, hi) ((0, 0): none)."""
    if mapping is None:
        return 0, 0
    a = mapping.lp_fragment_address
    return a.start, a.start + a.numel


def _agree(param, planned: tuple[int, int], held: tuple[int, int]) -> None:
    """The range owners.py decided must be the one DeepSpeed holds (empty ranges are all equal)."""
    if planned != held and not (planned[0] >= planned[1] and held[0] >= held[1]):
        raise CheckpointError(f"internal error: a parameter of shape {tuple(param.shape)}: DeepSpeed holds elements "
                              f"[{held[0]}, {held[1]}), megatron_ext/checkpoint/owners.py says [{planned[0]}, "
                              f"{planned[1]}): its partition arithmetic no longer matches this DeepSpeed")


_HOST_BUFFERS: dict[str, torch.Tensor] = {}  # pinned host copies, reused from one save to the next


def _to_host(key: str, t: torch.Tensor, dtype, copy: bool = True) -> torch.Tensor:
    """``t`` on the host, in ``dtype``. With ``copy`` a copy that training can no longer change (a
    background save writes its bytes later); without it (a synchronous save writes them before
    training goes on) a CPU tensor already in that dtype and contiguous is not copied at all."""
    src = t.detach()
    t = src.to(dtype or src.dtype)
    if t.device.type == "cpu":
        if not t.is_contiguous():
            return t.contiguous()
        return t.clone() if copy and t.data_ptr() == src.data_ptr() else t  # .to() copied it already
    buf = _HOST_BUFFERS.get(key)
    if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
        buf = _HOST_BUFFERS[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return buf.copy_(t, non_blocking=True)


def _set_states(engine, param, values: dict[str, torch.Tensor]) -> None:
    """Without ZeRO: the parameter (its own master copy) and its Adam moments, whole."""
    states = _replicated_states(engine, param)
    param.data.copy_(values["model"].to(param.dtype))
    if "exp_avg" in values:
        st = states[param]
        st["exp_avg"] = values["exp_avg"].to(param.device, param.dtype).clone()
        st["exp_avg_sq"] = values["exp_avg_sq"].to(param.device, param.dtype).clone()


def _set_zero3_partition(param, source, name: str, shape: tuple[int, ...], moments: tuple,
                         gain_ratio: float) -> None:
    """ZeRO-3: this rank's partition of the master weight, of the Adam moments and of the
    model's own (low-precision) weight, from only the elements it holds (see :func:`_zero3_range`):
    no gather, no whole tensor on any rank. ``source``: load.py's ``_ShardSource``."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    if param.ds_status == ZeroParamStatus.AVAILABLE:
        param.partition()  # drop a whole copy (a persistent parameter): the next forward gathers the new partitions
    lo, hi, size = _zero3_range(param)
    for kind in ("model", *moments):  # on every rank, even one that holds only padding
        source.check(f"{kind}/{name}", name, shape)
    if hi <= lo:
        return  # this rank's partition is all padding
    values = {k: source.part(f"{k}/{name}", name, shape, lo, hi) for k in ("model", *moments)}
    if is_norm_gain(name) and gain_ratio != 1.0:
        _rescale_gain(values, gain_ratio)
    param.ds_tensor.data[:hi - lo].copy_(values["model"])

    def padded(t: torch.Tensor) -> torch.Tensor:  # DeepSpeed sets whole partitions, padding included
        return torch.nn.functional.pad(t.float(), (0, size - (hi - lo)))

    safe_set_local_fp32_param(param, padded(values["model"]))
    for kind in moments:
        safe_set_local_optimizer_state(param, padded(values[kind]), kind)


def _rescale_gain(values: dict[str, torch.Tensor], ratio: float) -> None:
    """Re-express a norm gain stored at one scale (see model.RMSNorm) at another, exactly as the
    training would have: weight x ratio, Adam's m / ratio and v / ratio^2 (gradients of a
    parameter stored 1/ratio times larger are ratio times smaller)."""
    values["model"] = values["model"].float() * ratio
    if "exp_avg" in values:
        values["exp_avg"] = values["exp_avg"].float() / ratio
        values["exp_avg_sq"] = values["exp_avg_sq"].float() / ratio**2


def _set_adam_step(engine, step: int) -> None:
    for st in _base_optimizer(engine).state.values():
        st["step"] = torch.full_like(st["step"], step) if torch.is_tensor(st["step"]) else step
