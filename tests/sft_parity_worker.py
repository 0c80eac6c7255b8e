"""torchrun worker for tests/test_sft.py: one global batch of SFT conversations through the real
engine three ways (one conversation per row; packed with varlen attention; packed with the dense
block mask), same weights, lr 0. Rank 0 writes each way's eval loss, train-step loss and
gradient norm to OUT (JSON).

    torchrun --nproc-per-node N tests/sft_parity_worker.py PREPARED VOCAB OUT [override ...]
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import torch.distributed as dist  # noqa: E402

from megatron_ext import attention, engine as engine_module  # noqa: E402
from megatron_ext.config import load_recipe  # noqa: E402
from megatron_ext.data import build_datasets, microbatches  # noqa: E402
from megatron_ext.engine import Engine, init_distributed  # noqa: E402
from megatron_ext.model import build_model  # noqa: E402

WAYS = {"separate": ["data.packing=false"], "varlen": ["train.packed_attention=varlen"],
        "dense": ["train.packed_attention=dense"]}


CALLS = {"dense_mask": 0, "varlen_attention": 0}


def counted(name, func):
    def wrapper(*args, **kwargs):
        out = func(*args, **kwargs)
        if name == "varlen_attention" or out is not None:  # attention_mask returns None for unpacked rows
            CALLS[name] += 1
        return out
    return wrapper


def main() -> None:
    # count which path each way takes: the dense [b, 1, s, s] mask or the per-document kernel
    engine_module.attention_mask = counted("dense_mask", engine_module.attention_mask)
    import megatron_ext.model as model_module

    model_module.varlen_attention = counted("varlen_attention", attention.varlen_attention)
    prepared, vocab, out, *extra = sys.argv[1:]
    base = [f"data.sft_path={prepared}", f"model.vocab_size={vocab}", "checkpoint.init_from=null",
            "train.tensorboard=false", "train.precision=fp32", "data.epochs=1", "layout.micro_batch=4",
            "layout.global_batch=24", *extra]
    results, info = {}, None
    for way, overrides in WAYS.items():
        r = load_recipe(ROOT / "recipes" / "sft-tiny.yaml", base + overrides)
        CALLS.update(dense_mask=0, varlen_attention=0)
        info = info or init_distributed(r)
        engine = Engine(r, build_model(r, info.on_gpu), info)
        train, _ = build_datasets(r)
        batch = microbatches(train, 0, r, 0)
        loss_sum, tokens = engine.eval_totals(batch)
        step = engine.train_step(batch, lr=0.0)
        results[way] = {"eval_loss": loss_sum / tokens, "tokens": tokens, "rows": len(train),
                        "loss": step.loss, "grad_norm": step.grad_norm, **CALLS}
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
