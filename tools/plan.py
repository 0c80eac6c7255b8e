#!/usr/bin/env python
"""Does a recipe fit on the GPUs, and how fast will it run? (see megatron_ext/plan.py)

    python tools/plan.py recipes/8b.yaml --gpus 64 --gpu-memory 80GiB
    python tools/plan.py recipes/8b.yaml layout.recompute=full --gpus 64
    python tools/plan.py recipes/24b.yaml --gpus 128 --search

Exit status 0 when the layout fits, 1 when it does not (or is invalid), so a submit script can
run the plan first. With --search the recipe's layout is ignored and the 10 fastest layouts that
fit are listed (exit 1 when none fits).
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_ext.config import RecipeError, load_recipe  # noqa: E402
from megatron_ext.plan import (Hardware, check_fits, format_plan, format_search,  # noqa: E402
                               make_plan, parse_bytes, search)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="section.key=value recipe overrides")
    ap.add_argument("--gpus", type=int, default=None,
                    help="GPU count (default: the recipe's tp x pp x dp)")
    ap.add_argument("--gpu-memory", default="80GiB", help="per GPU, e.g. 80GiB, 141GB (default 80GiB)")
    ap.add_argument("--gpu-tflops", type=float, default=989.0,
                    help="dense bf16 peak TFLOP/s per GPU (default 989, H100 SXM)")
    ap.add_argument("--mfu", type=float, default=0.40,
                    help="kernel efficiency before bubble/communication/recompute (default 0.40)")
    ap.add_argument("--tp-bandwidth", type=float, default=250.0,
                    help="NCCL bus bandwidth inside a node, GB/s (default 250)")
    ap.add_argument("--dp-bandwidth", type=float, default=40.0,
                    help="per-GPU bandwidth across nodes, GB/s (default 40, ~400 Gb/s IB)")
    ap.add_argument("--search", action="store_true", help="list the fastest layouts that fit")
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args(argv)

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        hw = Hardware(gpus=args.gpus or recipe.layout.world_size,
                      gpu_memory=parse_bytes(args.gpu_memory), gpu_tflops=args.gpu_tflops,
                      mfu=args.mfu, tp_bandwidth=args.tp_bandwidth * 1e9,
                      dp_bandwidth=args.dp_bandwidth * 1e9)
        if args.search:
            plans = search(recipe, hw, top=args.top)
            if not plans:
                print(f"no layout of {args.recipe} fits on {hw.gpus} GPUs x "
                      f"{hw.gpu_memory / 2**30:.1f} GiB: use more GPUs or bigger ones", file=sys.stderr)
                return 1
            print(f"top {len(plans)} layouts for {args.recipe} on {hw.gpus} GPUs "
                  f"(fastest first; model in megatron_ext/plan.py)")
            print(format_search(plans))
            print()
            print(format_plan(plans[0], title=f"{args.recipe} [best]"))
            return 0
        plan = make_plan(recipe, hw)
        print(format_plan(plan, title=args.recipe))
        check_fits(plan)
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `tools/plan.py ... | head` ends quietly
    sys.exit(main())
