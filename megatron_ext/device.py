"""The CPU layer: lets Megatron-Core run on CPU with the gloo backend.

Megatron-Core has no CPU path: it asks for ``torch.cuda.current_device()``, allocates tensors on
"cuda" (causal masks, pipeline p2p shape buffers, token counters) and keeps its tensor-parallel
RNG streams in CUDA generators. On a machine without a GPU we (1) rewrite every "cuda" device
argument to "cpu" in the torch functions that take a device (the factories, ``Tensor.to``,
``Tensor.new_*``; ``Tensor.cuda`` returns the tensor) and (2) point the handful of ``torch.cuda``
RNG/device functions Megatron calls at their CPU twins.

Only the calls that take a device pay anything: a process-wide TorchFunctionMode would see every
torch call (about 1,600 per step of the tiny model, 18% of its CPU time) and switch off torch's
C++ fast paths. :class:`CudaToCpu` (the mode) stays available for code that wants the
whole-call rewrite in a scope.

Everything here is installed by :func:`activate_cpu_layer`, which is only called when training on
CPU, so the GPU path never pays for any of it.
"""
from __future__ import annotations

import functools
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


def _cpu(device):
    return "cpu" if _is_cuda(device) else device


# torch functions with a ``device`` keyword (aten schemas with a Device argument), and the Tensor
# methods that take one.
FACTORIES = ("arange", "as_tensor", "asarray", "empty", "empty_like", "empty_permuted", "empty_strided", "eye",
             "full", "full_like", "linspace", "logspace", "normal", "ones", "ones_like", "rand", "rand_like",
             "randint", "randint_like", "randn", "randn_like", "randperm", "range", "scalar_tensor", "tensor",
             "tril_indices", "triu_indices", "zeros", "zeros_like", "sparse_coo_tensor")
TENSOR_METHODS = ("new_empty", "new_empty_strided", "new_full", "new_ones", "new_tensor", "new_zeros")


def _device_kwarg_to_cpu(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = kwargs.get("device")
        if device is not None and _is_cuda(device):
            kwargs["device"] = "cpu"
        return fn(*args, **kwargs)

    return wrapper


def _tensor_to(to):
    @functools.wraps(to)
    def wrapper(self, *args, **kwargs):
        if args and not isinstance(args[0], torch.Tensor) and _is_cuda(args[0]):
            args = ("cpu", *args[1:])
        device = kwargs.get("device")
        if device is not None and _is_cuda(device):
            kwargs["device"] = "cpu"
        return to(self, *args, **kwargs)

    return wrapper


def _patch_device_functions() -> None:
    for name in FACTORIES:
        if hasattr(torch, name):
            setattr(torch, name, _device_kwarg_to_cpu(getattr(torch, name)))
    for name in TENSOR_METHODS:
        setattr(torch.Tensor, name, _device_kwarg_to_cpu(getattr(torch.Tensor, name)))
    torch.Tensor.to = _tensor_to(torch.Tensor.to)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


class CudaToCpu(TorchFunctionMode):
    """Rewrites cuda device arguments of every torch call to cpu, in a ``with`` scope."""

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
    _patch_device_functions()


def setup_device(local_rank: int) -> torch.device:
    """Pick this rank's device; installs the CPU layer when no GPU is used."""
    if use_gpu():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    activate_cpu_layer()
    return torch.device("cpu")


def backend() -> str:
    return "nccl" if use_gpu() else "gloo"
