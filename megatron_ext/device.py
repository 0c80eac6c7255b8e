"""The CPU layer: lets Megatron-Core run on CPU with the gloo backend.

Megatron-Core has no CPU path: it asks for ``torch.cuda.current_device()``, allocates tensors on
"cuda" (causal masks, pipeline p2p shape buffers, rotary frequencies) and keeps its tensor-parallel
RNG streams in CUDA generators. On a machine without a GPU we (1) rewrite every "cuda" device
argument of a torch call to "cpu" with a TorchFunctionMode and (2) point the handful of
``torch.cuda`` RNG/device functions Megatron calls at their CPU twins.

Everything here is installed by :func:`activate_cpu_layer`, which is only called when training on
CPU, so the GPU path never pays for the mode's per-call dispatch.
"""
from __future__ import annotations

import os

import torch
from torch.overrides import TorchFunctionMode

_ACTIVE = False


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # Megatron passes torch.cuda.current_device() (an int index) as a device.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Rewrites cuda device arguments of torch calls to cpu."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and not isinstance(args[1], torch.Tensor):
            if _is_cuda(args[1]):
                args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def use_gpu() -> bool:
    """Train on GPU when one is visible, unless GAPERON_DEVICE=cpu forces the CPU path."""
    return os.environ.get("GAPERON_DEVICE", "").lower() != "cpu" and torch.cuda.is_available()


def activate_cpu_layer() -> None:
    """Install the CPU layer for the rest of the process (idempotent)."""
    global _ACTIVE
    if _ACTIVE:
        return
    _ACTIVE = True
    # A device, not an index: code paths the mode does not see (autograd backward of Megatron's
    # custom Functions) then still allocate on CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.device_count = lambda: 0
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.cuda.random.get_rng_state = torch.cuda.get_rng_state
    # The CPU generator stands in for the CUDA one (torch.manual_seed itself seeds "all cuda").
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.manual_seed_all = lambda seed: None
    # Megatron's tracker restores states through this private helper; route it to the CPU RNG.
    from megatron.core.tensor_parallel import random as mpu_random

    mpu_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    mpu_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mode = _CudaToCpu()
    mode.__enter__()  # stays pushed for the life of the process


def setup_device(local_rank: int) -> torch.device:
    """Pick this rank's device; installs the CPU layer when no GPU is used."""
    if use_gpu():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    activate_cpu_layer()
    return torch.device("cpu")


def backend() -> str:
    return "nccl" if use_gpu() else "gloo"
