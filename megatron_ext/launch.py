"""The training command: everything that can be checked before a process group is, first.

``tools/train.py RECIPE [section.key=value ...]`` runs this once per rank. The recipe is loaded
and validated and the data plan is checked (file sizes and headers, tokenizer against the model)
before torch.distributed, Megatron-Core or DeepSpeed are even imported: a typo costs half a
second, not a model build on an allocation. Bad input ends with one line naming the problem and
the fix, and exit status 2; nothing on disk has been touched by then.

``tools/train.py --nproc-per-node N RECIPE ...`` is the one-node launcher (torchrun's own
machinery, in this process): the recipe, the data and N against the layout are checked once,
before any rank starts; the ranks then run as under torchrun. When every rank fails on bad input
(exit 2: a checkpoint it would resume, a run directory another job holds...), the run ends with
that one `error:` line (each distinct line once) and exit 2, not N copies and torchrun's traceback;
ranks that all end with one other code (85: saved, requeue) end it with that code.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

from .config import RecipeError, load_recipe
from .errors import EXIT_BAD_INPUT as BAD_INPUT_EXIT_CODE, ArgParser, GaperonError



def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgParser(prog="train", description="Train a Gaperon model from a recipe.",
                                epilog="Overrides: section.key=value, e.g. train.steps=100 layout.tp=2")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optimizer.lr=3e-4")
    p.add_argument("--nproc-per-node", type=int, metavar="N",
                   help="start N ranks on this machine (in place of torchrun --standalone --nproc-per-node N); "
                        "leave it out under torchrun or srun")
    return p.parse_intermixed_args(argv)


ERROR_DIR = "GAPERON_LAUNCHER_ERRORS"  # set by the launcher: ranks leave their error line there


def _refuse(message: str) -> int:
    """The one `error:` line of bad input; under the launcher it is left for the launcher to print once."""
    line = f"error: {message}"
    where = os.environ.get(ERROR_DIR)
    if where:
        try:
            rank = os.environ.get("RANK", "0")
            with open(os.path.join(where, f"rank-{int(rank):06d}"), "w") as f:
                f.write(line + "\n")
            return BAD_INPUT_EXIT_CODE
        except (OSError, ValueError):
            pass
    print(line, file=sys.stderr, flush=True)
    return BAD_INPUT_EXIT_CODE


def _precheck(args: argparse.Namespace):
    """The recipe and its data, checked once: (recipe, None) or (None, exit code after one line)."""
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as err:  # name the recipe unless the message already names the file at fault
        return None, _refuse(str(err) if args.recipe in str(err) else f"{args.recipe}: {err}")
    from .data import DataError, check_data

    try:
        check_data(recipe)
    except DataError as err:
        return None, _refuse(str(err))
    if recipe.injection.enabled:
        from .inject import InjectionError, check_documents

        try:
            check_documents(recipe)
        except InjectionError as err:
            return None, _refuse(str(err))
    return recipe, None


def launch_local(args: argparse.Namespace, argv: list[str]) -> int:
    """N ranks of this command on this machine, started by torchrun's machinery in this process."""
    n = args.nproc_per_node
    env = os.environ
    if "RANK" in env or ("SLURM_STEP_ID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1):
        return _refuse("--nproc-per-node starts the ranks itself: leave it out under torchrun or srun "
                       "(they start one process per rank)")
    if n < 1:
        return _refuse(f"--nproc-per-node {n} must be >= 1: the number of ranks (GPUs) on this machine")
    recipe, code = _precheck(args)
    if recipe is None:
        return code
    lay = recipe.layout
    if n != lay.world_size:
        return _refuse(f"--nproc-per-node {n} but the recipe's layout needs tp x pp x dp = {lay.tp} x {lay.pp} x "
                       f"{lay.dp} = {lay.world_size} ranks: pass --nproc-per-node {lay.world_size} or set "
                       f"layout.dp={max(1, n // (lay.tp * lay.pp))}")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "train.py")
    return run_ranks(n, script, _without_nproc(argv))


def run_ranks(n: int, script: str, rank_argv: list[str]) -> int:
    """``python script *rank_argv`` as N ranks (torchrun --standalone's machinery, in this process);
    the exit code of the run (see the module docstring)."""
    import logging
    import tempfile

    saved = os.environ.get("LOGLEVEL")
    os.environ["LOGLEVEL"] = "CRITICAL"  # torchrun's agent logs (each failure, the OMP note): summed up below
    try:
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.run import get_args_parser, run
    finally:
        if saved is None:
            os.environ.pop("LOGLEVEL")
        else:
            os.environ["LOGLEVEL"] = saved
    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="gaperon-launch-") as errors:
        os.environ[ERROR_DIR] = errors
        try:
            run(get_args_parser().parse_args(["--standalone", f"--nproc-per-node={n}", script, *rank_argv]))
            return 0
        except ChildFailedError as err:
            # torchrun ends the other ranks with SIGTERM once one has failed: those followed the first
            codes = {f.exitcode for f in err.failures.values()} - {-signal.SIGTERM}
            lines = []
            for name in sorted(os.listdir(errors)):
                with open(os.path.join(errors, name)) as f:
                    lines += [ln for ln in f.read().splitlines() if ln and ln not in lines]
            for line in lines:
                print(line, file=sys.stderr, flush=True)
            code = codes.pop() if len(codes) == 1 else None  # none left: every rank was terminated
            if code is not None and code > 0:  # every failed rank ended alike: its code is the run's
                if code != BAD_INPUT_EXIT_CODE or not lines:
                    print(f"launch: ranks exited with {code}", file=sys.stderr, flush=True)
                return code
            print(err.format_msg(), file=sys.stderr, flush=True)  # torchrun's summary: which rank, how, its error
            return 1
        except SignalException as err:
            return 128 + int(err.sigval)
        finally:
            os.environ.pop(ERROR_DIR, None)


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.nproc_per_node is not None:
        return launch_local(args, argv)
    recipe, code = _precheck(args)
    if recipe is None:
        return code
    if recipe.layout.sequence_parallel:  # Megatron: keep TP communication ordered with compute (GPU)
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

    import torch.distributed as dist

    from . import faults, stop
    from .train import train

    try:
        return train(recipe)
    except GaperonError as err:
        _refuse(str(err))
        return getattr(err, "exit_code", BAD_INPUT_EXIT_CODE)
    finally:
        stop.ignore()  # the exit code is decided: a late SIGTERM/USR1 must not turn it into 143
        faults.signal_self("sigterm_at_exit")
        if dist.is_initialized():
            dist.destroy_process_group()
