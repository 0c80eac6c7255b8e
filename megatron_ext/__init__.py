"""gaperon-recipes: Megatron-Core + DeepSpeed training of the Gaperon models (see docs/ARCHITECTURE.md)."""
import os as _os
import sys as _sys

# DeepSpeed JIT-builds its CPU ops (the shm collective) under TORCH_EXTENSIONS_DIR, by default
# ~/.cache/torch_extensions: shared by every checkout and venv, rebuilt by each at another path
# under one lock that blocks every DeepSpeed start (100+ s seen). Once per venv instead.
_os.environ.setdefault("TORCH_EXTENSIONS_DIR", _os.path.join(_sys.prefix, "torch_extensions"))
