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
    """ZeRO-3: the flat range [lo, hi) of ``param`` that this rank's partition holds, and the
    partition's size p. DeepSpeed pads the tensor to dp * p elements, p = ceil(n / dp), and DP
    rank r holds elements [r * p, (r + 1) * p): the last partition ends in padding, and a rank
    with r * p >= n holds nothing but padding (n = 5 at dp = 4: p = 2, rank 3)."""
    size = param.ds_tensor.ds_numel
    lo = dist.get_rank(group=param.ds_process_group) * size
    return min(lo, param.ds_numel), min(lo + size, param.ds_numel), size


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


def even_range(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rank ``rank``'s part of ``n`` elements split in ``size`` equal (ceil) chunks."""
    chunk = -(-n // size)
    return min(n, rank * chunk), min(n, (rank + 1) * chunk)


def replicated_shares(engine, dp_rank: int, dp_size: int) -> dict[int, tuple[int, int]]:
    """Without ZeRO every DP rank holds the same states: which flat range of each parameter
    (by ``id``) this DP rank writes. The stage's parameters, end to end, are cut into dp even
    ranges (as ZeRO-1 cuts its flat buffer), so each rank writes 1/dp of the bytes and a tensor
    is split only where a cut falls in it: meta.json's index grows by dp fragments per stage,
    not dp per tensor."""
    params = [p for chunk in engine.chunks for p in chunk.parameters()]
    lo, hi = even_range(sum(p.numel() for p in params), dp_rank, dp_size)
    shares, offset = {}, 0
    for p in params:
        shares[id(p)] = (min(max(lo - offset, 0), p.numel()), min(max(hi - offset, 0), p.numel()))
        offset += p.numel()
    return shares


def _owned(engine, param, shares: dict[int, tuple[int, int]]) -> tuple[int, dict[str, torch.Tensor]]:
    """The flat range of this rank's TP shard of ``param`` that this DP rank writes (its start),
    and the master weight and Adam moments over it. Under ZeRO-1/2 that is DeepSpeed's own
    partition (views of its flat buffers: no copy, no collective); under ZeRO-3 it is the
    parameter's own partition, trimmed of its padding (views as well, see :func:`_zero3_range`);
    without ZeRO the states are replicated and each DP rank writes its range in ``shares``
    (:func:`replicated_shares`)."""
    if hasattr(param, "ds_id"):  # ZeRO-3
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        lo, hi, _ = _zero3_range(param)
        out = {"model": safe_get_local_fp32_param(param)}
        for kind in ("exp_avg", "exp_avg_sq"):
            try:
                out[kind] = safe_get_local_optimizer_state(param, kind)
            except KeyError:  # no optimizer state yet
                pass
        return lo, {k: t[:hi - lo] for k, t in out.items() if t is not None}
    mapping = getattr(param, "_hp_mapping", _ABSENT)
    if mapping is None:  # none of this parameter lies in this rank's partition
        return 0, {}
    if mapping is not _ABSENT:
        out = {"model": mapping.get_hp_fragment()}
        for kind in ("exp_avg", "exp_avg_sq"):
            try:
                out[kind] = mapping.get_hp_fragment(kind)
            except (KeyError, ValueError, TypeError):  # no optimizer state yet
                pass
        return mapping.lp_fragment_address.start, out
    lo, hi = shares[id(param)]
    if lo == hi:
        return 0, {}
    return lo, {k: t.reshape(-1)[lo:hi] for k, t in _get_states(engine, param).items() if t is not None}


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
