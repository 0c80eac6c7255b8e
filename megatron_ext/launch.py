"""The training command: everything that can be checked before a process group is, first.

``tools/train.py RECIPE [section.key=value ...]`` runs this once per rank. The recipe is loaded
and validated and the data plan is checked (file sizes and headers, tokenizer against the model)
before torch.distributed, Megatron-Core or DeepSpeed are even imported: a typo costs half a
second, not a model build on an allocation. Bad input ends with one line naming the problem and
the fix, and exit status 2; nothing on disk has been touched by then.
"""
from __future__ import annotations

import argparse
import os
import sys

from .config import RecipeError, load_recipe
from .errors import EXIT_BAD_INPUT as BAD_INPUT_EXIT_CODE, ArgParser, GaperonError, report



def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgParser(prog="train", description="Train a Gaperon model from a recipe.",
                                epilog="Overrides: section.key=value, e.g. train.steps=100 layout.tp=2")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=3e-4")
    return p.parse_args(argv)


def _refuse(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return BAD_INPUT_EXIT_CODE


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as err:  # name the recipe unless the message already names the file at fault
        return _refuse(str(err) if args.recipe in str(err) else f"{args.recipe}: {err}")
    if recipe.layout.sequence_parallel:  # Megatron: keep TP communication ordered with compute (GPU)
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    from .data import DataError, check_data

    try:
        check_data(recipe)
    except DataError as err:
        return _refuse(str(err))

    import torch.distributed as dist

    from . import faults, stop
    from .train import train

    try:
        return train(recipe)
    except GaperonError as err:
        return report(err)
    finally:
        stop.ignore()  # the exit code is decided: a late SIGTERM/USR1 must not turn it into 143
        faults.signal_self("sigterm_at_exit")
        if dist.is_initialized():
            dist.destroy_process_group()
