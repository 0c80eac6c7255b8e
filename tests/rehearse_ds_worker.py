"""torchrun worker for tests/test_rehearse.py: a real DeepSpeed engine at the recipe's layout (gloo,
CPU); each rank compares the element ranges checkpoint/owners.py gives it with DeepSpeed's own
(ZeRO-1/2: ``param._hp_mapping``; ZeRO-3: the parameter's partition) and writes them to OUT.

    torchrun --nproc-per-node N tests/rehearse_ds_worker.py OUT [override ...]
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402

from megatron_ext.checkpoint.owners import owned_ranges, param_specs, zero3_range  # noqa: E402
from megatron_ext.checkpoint.states import _fragment  # noqa: E402
from megatron_ext.config import load_recipe  # noqa: E402
from megatron_ext.engine import Engine, init_distributed  # noqa: E402
from megatron_ext.model import build_model  # noqa: E402


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", overrides)
    info = init_distributed(recipe)
    engine = Engine(recipe, build_model(recipe, info.on_gpu), info)
    specs = param_specs(engine.chunks, recipe.optimizer.weight_decay)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    planned = owned_ranges([s for _, s in specs], recipe.layout.zero_stage, dp_rank, dp)
    held = []
    for param, spec in specs:
        if hasattr(param, "ds_id"):
            held.append(list(zero3_range(param.ds_numel, dp_rank, dp)[:2])
                        if param.ds_tensor.ds_numel == -(-param.ds_numel // dp) else [-1, -1])
        else:
            held.append(list(_fragment(param._hp_mapping)))
    rows = [[spec.name, list(p), h] for (_, spec), p, h in zip(specs, planned, held)]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(rows, gathered, dst=0)
    if dist.get_rank() == 0:
        out.write_text(json.dumps(gathered))
    dist.barrier()


if __name__ == "__main__":
    main()
