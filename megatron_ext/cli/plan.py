"""Does a recipe fit on the GPUs, and how fast will it run? (see megatron_ext/plan.py)

    python tools/plan.py recipes/8b.yaml --gpus 64 --gpu-memory 80GiB
    python tools/plan.py recipes/8b.yaml --gpus 64 layout.recompute=full
    python tools/plan.py recipes/24b.yaml --gpus 128 --search
    python tools/plan.py recipes/phases/naive.yaml --epochs    # + epochs of each blend dataset

Exit status 0 when the layout fits; 1 when it does not (too much memory per GPU, or a layout
that does not use --gpus), so a submit script can run the plan first; 2 on bad input (a recipe
that does not load, an option out of range), with one line on stderr that names the fix. With
--search the recipe's layout is ignored and the 10 fastest layouts that fit are listed (exit 1
when none fits). Overrides may come before or after the options.
"""
from __future__ import annotations

import argparse
import math
import sys

from ..config import RecipeError, load_recipe
from ..errors import DEFAULT_GPU_TFLOPS, ArgParser, GaperonError, report
from ..plan import DoesNotFit, Hardware, PlanError, check_fits, format_interval, interval_advice, make_plan, parse_bytes, search
from ..plan_report import blend_epochs, format_epochs, format_plan, format_search


def check_args(args: argparse.Namespace) -> None:
    """Refuse hardware figures no GPU has, before the recipe is read (PlanError, exit 2)."""
    if args.gpus is not None and args.gpus < 1:
        raise PlanError(f"--gpus {args.gpus} must be >= 1 (or leave it out: the recipe's tp x pp x dp)")
    if not (args.gpu_tflops > 0 and math.isfinite(args.gpu_tflops)):
        raise PlanError(f"--gpu-tflops {args.gpu_tflops:g} must be > 0: the dense bf16 peak TFLOP/s per GPU, "
                        "e.g. 989 for an H100 SXM")
    if not 0 < args.mfu <= 1:
        raise PlanError(f"--mfu {args.mfu:g} must be in (0, 1]: the fraction of peak the kernels reach, "
                        "e.g. 0.4")
    for flag, value in (("--tp-bandwidth", args.tp_bandwidth), ("--dp-bandwidth", args.dp_bandwidth)):
        if not (value > 0 and math.isfinite(value)):
            raise PlanError(f"{flag} {value:g} must be > 0: GB/s per GPU, e.g. 250 inside a node, 40 across nodes")
    if args.top < 1:
        raise PlanError(f"--top {args.top} must be >= 1: how many layouts --search lists")
    try:
        parse_bytes(args.gpu_memory)
    except PlanError as err:
        raise PlanError(f"--gpu-memory: {err}") from None


def _advisor(cluster: str | None):
    """Formats the Young-Daly checkpoint-interval line of a plan, with the profile's figures."""
    kwargs = {}
    if cluster:
        from ..slurm import load_profile, parse_slurm_time

        profile = load_profile(cluster)
        allocation = parse_slurm_time(profile.time)
        kwargs = {"failures_per_gpu_hour": profile.failures_per_gpu_hour, "bandwidth_gbs": profile.fs_bandwidth_gbs,
                  **({"allocation_s": allocation} if math.isfinite(allocation) else {})}
    return lambda plan: format_interval(interval_advice(plan.recipe, plan.time.step, plan.hardware.gpus, **kwargs))


def main(argv: list[str] | None = None) -> int:
    ap = ArgParser(prog="plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="section.key=value recipe overrides")
    ap.add_argument("--gpus", type=int, default=None,
                    help="GPU count (default: the recipe's tp x pp x dp)")
    ap.add_argument("--gpu-memory", default="80GiB", help="per GPU, e.g. 80GiB, 141GB (default 80GiB)")
    ap.add_argument("--gpu-tflops", type=float, default=DEFAULT_GPU_TFLOPS,
                    help=f"dense bf16 peak TFLOP/s per GPU (default {DEFAULT_GPU_TFLOPS:g}, H100 SXM)")
    ap.add_argument("--mfu", type=float, default=0.40,
                    help="kernel efficiency before bubble/communication/recompute, in (0, 1] (default 0.40)")
    ap.add_argument("--tp-bandwidth", type=float, default=250.0,
                    help="NCCL bus bandwidth inside a node, GB/s (default 250)")
    ap.add_argument("--dp-bandwidth", type=float, default=40.0,
                    help="per-GPU bandwidth across nodes, GB/s (default 40, ~400 Gb/s IB)")
    ap.add_argument("--cluster", help="a profile in slurm/clusters/ (or a .yaml): its failures_per_gpu_hour, "
                    "fs_bandwidth_gbs and time set the checkpoint-interval advice (default: Llama 3's failure "
                    "rate, 2 GB/s, 20 h)")
    ap.add_argument("--search", action="store_true", help="list the fastest layouts that fit")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--epochs", action="store_true",
                    help="read each data.blend dataset's token count (.idx) and print the epochs train.steps make")
    args = ap.parse_intermixed_args(argv)  # overrides may come after options

    try:
        check_args(args)
        recipe = load_recipe(args.recipe, args.overrides)
        hw = Hardware(gpus=recipe.layout.world_size if args.gpus is None else args.gpus,
                      gpu_memory=parse_bytes(args.gpu_memory), gpu_tflops=args.gpu_tflops,
                      mfu=args.mfu, tp_bandwidth=args.tp_bandwidth * 1e9,
                      dp_bandwidth=args.dp_bandwidth * 1e9)
        advise = _advisor(args.cluster)
        if args.search:
            stats: dict = {}
            plans = search(recipe, hw, top=args.top, stats=stats)
            if not stats["valid"]:  # no layout can use exactly this many GPUs: more GPUs would not help
                lay = recipe.layout
                most = 8 * recipe.model.num_layers * lay.global_batch
                raise PlanError(f"--gpus {hw.gpus}: no layout of {args.recipe} uses exactly {hw.gpus} GPUs "
                                f"(tp x pp x dp = GPUs with tp in 1, 2, 4, 8, pp dividing the "
                                f"{recipe.model.num_layers} layers, dp dividing layout.global_batch="
                                f"{lay.global_batch}; at most 8 x {recipe.model.num_layers} x {lay.global_batch}"
                                f" = {most:,}): give a GPU count such a layout has, e.g. {lay.world_size} (the recipe's "
                                "own tp x pp x dp)")
            if not plans:
                print(f"plan: no layout of {args.recipe} fits on {hw.gpus} GPUs x "
                      f"{hw.gpu_memory / 2**30:.1f} GiB: use more GPUs or bigger ones", file=sys.stderr)
                return 1
            print(f"top {len(plans)} layouts for {args.recipe} on {hw.gpus} GPUs "
                  f"(fastest first; model in megatron_ext/plan.py)")
            print(format_search(plans))
            print()
            print(format_plan(plans[0], title=f"{args.recipe} [best]"))
            print(advise(plans[0]))
            return 0
        plan = make_plan(recipe, hw)
        print(format_plan(plan, title=args.recipe))
        print(advise(plan))
        if args.epochs:
            print(format_epochs(recipe), flush=True)
            missing = [r["prefix"] for r in blend_epochs(recipe) if r["tokens"] is None]
            if missing:
                shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                raise PlanError(f"--epochs: {len(missing)} data.blend dataset(s) of {args.recipe} not found "
                                f"(no .idx): {shown}; preprocess them or fix data.blend")
        check_fits(plan)
    except DoesNotFit as err:
        print(f"plan: {err}", file=sys.stderr)
        return 1
    except PlanError as err:  # an option out of range
        return report(err)
    except RecipeError as err:  # the recipe does not load: name it unless the message does
        return report(err if args.recipe in str(err) else f"{args.recipe}: {err}")
    except GaperonError as err:  # a --cluster profile that does not load
        return report(err)
    return 0
