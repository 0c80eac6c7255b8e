"""Submit a recipe to SLURM: one srun task per GPU, checkpoint + requeue before the time limit.

    python tools/submit.py recipes/8b.yaml --nodes 8 --cluster my-site
    python tools/submit.py recipes/tiny.yaml --cluster local layout.dp=2 --dry-run
    python tools/submit.py recipes/8b.yaml --chain recipes/8b-mid.yaml,recipes/8b-sft.yaml \\
        --hf-out hf/gaperon-8b          # phases wait for each other (afterok), then HF export
    python tools/submit.py recipes/8b.yaml --chain ... --evaluate gaperon   # + eval job after each phase
    python tools/submit.py recipes/phases/mid.yaml --sizes 1.5b,8b,24b   # one job per size
    python tools/submit.py recipes/1.5b.yaml --cooldown-from 20000,40000   # WSD branch-offs: one
        # cooldown per listed checkpoint of the stable run, in <output_dir>-cooldown<STEP>
    python tools/submit.py preprocess recipes/preprocess/gaperon-phase1.yaml --cluster my-site \\
        --train recipes/phases/naive.yaml   # job arrays + merges, then training (afterok)

--nodes defaults to the recipe's tp x pp x dp / --gpus-per-node. Bad input (unknown profile,
GPU count that does not match the layout, a --time SLURM cannot read, no sbatch) fails with exit
status 2 and one line on stderr before anything is submitted. Scripts, frozen recipes and logs go
to <train.output_dir>/slurm/.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from ..errors import ArgParser, GaperonError, report
from ..slurm import SubmitError, load_profile, plan_jobs, submit_jobs


def _list(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def _steps(text: str | None) -> list[int]:
    out = []
    for item in _list(text):
        if not item.isdigit() or int(item) < 1:
            raise SubmitError(f"--cooldown-from {text}: give checkpoint steps as positive integers, e.g. "
                              "--cooldown-from 20000,40000")
        out.append(int(item))
    return out


def preprocess_main(argv: list[str]) -> int:
    """tools/submit.py preprocess SPEC.yaml --cluster PROFILE [--train RECIPE [overrides]] [--dry-run]"""
    from ..slurm_preprocess import submit_preprocess

    ap = ArgParser(prog="submit preprocess", description="One job array per source of SPEC (tools/preprocess_data.py "
                 "--shard I/N), a merge job after each (afterok), and optionally training after every merge. "
                 "Submitting the same spec again redoes only the parts that are not complete.")
    ap.add_argument("spec", help="YAML: tokenizer, shards, workers, sources (see recipes/preprocess/)")
    ap.add_argument("overrides", nargs="*", help="section.key=value overrides of the --train recipe")
    ap.add_argument("--cluster", default="local", help="profile in slurm/clusters/ (cpu_partition, account, setup)")
    ap.add_argument("--train", help="a recipe to train once every source is merged")
    ap.add_argument("--chain", help="comma-separated recipes of the phases after --train")
    ap.add_argument("--nodes", type=int, help="--train: default tp x pp x dp / gpus per node")
    ap.add_argument("--dry-run", action="store_true", help="print the sbatch scripts, submit nothing")
    args = ap.parse_intermixed_args(argv)
    try:
        profile = load_profile(args.cluster)
        train = None
        if args.train:
            train = plan_jobs(args.train, args.overrides, profile, nodes=args.nodes, chain=_list(args.chain))
        elif args.overrides or args.chain:
            raise SubmitError("recipe overrides and --chain need --train RECIPE")
        submit_preprocess(args.spec, profile, args.dry_run, train)
    except GaperonError as err:
        return report(err)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["preprocess"]:
        return preprocess_main(argv[1:])
    ap = ArgParser(prog="submit", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="section.key=value recipe overrides (every job)")
    ap.add_argument("--cluster", default="local", help="profile in slurm/clusters/ or a .yaml path (default local)")
    ap.add_argument("--nodes", type=int, help="default: tp x pp x dp / gpus per node")
    ap.add_argument("--gpus-per-node", type=int, help="default: the profile's")
    ap.add_argument("--partition")
    ap.add_argument("--account")
    ap.add_argument("--time", help="time limit per allocation, e.g. 20:00:00 or 2-00:00:00 (default: the profile's)")
    ap.add_argument("--max-requeues", type=int, help="default: the profile's")
    ap.add_argument("--spare-nodes", type=int, help="nodes held beyond the training nodes, so that a crash or "
                    "hang restarts inside the allocation on healthy nodes (default: the profile's spare_nodes)")
    ap.add_argument("--dependency", help="sbatch --dependency for the first job(s), e.g. afterok:1234")
    ap.add_argument("--chain", help="comma-separated recipes of the phases that follow RECIPE")
    ap.add_argument("--hf-out", help="after the last phase, convert it to Hugging Face format here")
    ap.add_argument("--evaluate", metavar="SUITE",
                    help="after each phase, export and evaluate it (tools/evaluate.py --tasks SUITE; afterok)")
    ap.add_argument("--sizes", help="comma-separated sizes (recipes/<size>.yaml) to run RECIPE on")
    ap.add_argument("--cooldown-from", metavar="STEP[,STEP...]",
                    help="one cooldown job per listed step of this (WSD) run: checkpoint.init_mode=cooldown from "
                         "<output_dir>/checkpoints/step_STEP into <output_dir>-cooldown<STEP>; steps not saved yet "
                         "wait for the run, submitted first (afterok)")
    ap.add_argument("--cooldown-steps", type=int, help="length of each cooldown (default: schedule.decay_steps)")
    ap.add_argument("--command", help="run this on every task instead of tools/train.py (smoke tests)")
    ap.add_argument("--dry-run", action="store_true", help="print the sbatch scripts, submit nothing")
    args = ap.parse_intermixed_args(argv)  # overrides may come after options
    try:
        profile = load_profile(args.cluster)
        for key in ("partition", "account"):
            if getattr(args, key):
                setattr(profile, key, getattr(args, key))
        if args.spare_nodes is not None:
            if args.spare_nodes < 0:
                raise SubmitError(f"--spare-nodes {args.spare_nodes} must be >= 0: nodes held for crash "
                                        "restarts inside the allocation")
            profile.spare_nodes = args.spare_nodes
        jobs = plan_jobs(args.recipe, args.overrides, profile, args.gpus_per_node, args.nodes,
                         chain=_list(args.chain), sizes=_list(args.sizes), hf_out=args.hf_out,
                         command=shlex.split(args.command) if args.command else None, evaluate=args.evaluate,
                         cooldown_from=_steps(args.cooldown_from), cooldown_steps=args.cooldown_steps)
        submit_jobs(jobs, profile, args.dry_run, args.time, args.dependency, args.max_requeues)
    except GaperonError as err:
        return report(err)
    return 0
