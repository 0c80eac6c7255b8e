"""The install and env sub-steps: the carried wheels, then what the child processes can import and
which GPU they see."""
from __future__ import annotations

import json
import sys

from .common import SITE
from .metrics import error_of
from .runner import Suite
from .wheels import install_carried


def step_install(s: Suite) -> dict:
    if not s.args.install_carried:
        return {"status": "skipped", "reason": "no --install-carried (using this Python's packages)"
                + (f"; {SITE} on PYTHONPATH" if s.use_site else "")}
    return install_carried()


ENV_PROBE = r"""
import json, importlib, importlib.util, os, sys
out = {"python": sys.version.split()[0]}
import torch
out.update(torch=torch.__version__, torch_file=torch.__file__, cuda=torch.version.cuda,
           cuda_available=torch.cuda.is_available())
if torch.cuda.is_available() and os.environ.get("GAPERON_DEVICE") != "cpu":
    p = torch.cuda.get_device_properties(0)
    out.update(gpu=p.name, gpu_memory=p.total_memory, bf16=torch.cuda.is_bf16_supported())
for mod in ["megatron.core", "deepspeed", "pydantic", "transformers", "safetensors", "numpy", "yaml",
            "transformer_engine", "flash_attn", "flash_attn_interface", "apex"]:
    try:
        m = importlib.import_module(mod)
        out[mod] = getattr(m, "__version__", "ok")
    except Exception as e:
        out[mod] = None
        out[mod + "_error"] = f"{type(e).__name__}: {e}"[:300]
try:
    import megatron_ext.train  # the trainer's whole import path
    out["megatron_ext.train"] = "ok"
except Exception as e:
    out["megatron_ext.train"] = None
    out["megatron_ext.train_error"] = f"{type(e).__name__}: {e}"[:300]
print("ENV " + json.dumps(out))
"""


def step_env(s: Suite) -> dict:
    res = s.run("env", [([sys.executable, "-c", ENV_PROBE], s.env())], 60)[0]
    line = next((ln for ln in res["text"].splitlines() if ln.startswith("ENV ")), None)
    if line is None:
        return {"status": "error", "error": error_of(res)}
    info = json.loads(line[4:])
    s.gpu_memory = info.get("gpu_memory")
    status = "ok"
    problems = [k for k in ("megatron.core", "deepspeed", "pydantic", "transformers", "megatron_ext.train")
                if not info.get(k)]
    if problems:
        status = "error"
        info["error"] = "not importable: " + ", ".join(problems)
    if not s.dry and not info.get("gpu"):
        status = "error"
        info["error"] = (info.get("error", "") + "; no CUDA device: the GPU sub-steps are skipped").strip("; ")
    return {"status": status, **info, "seconds": res["seconds"]}
