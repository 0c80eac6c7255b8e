"""The `gaperon` command: one verb per job, each the `main(argv) -> int` of its module.

    gaperon train RECIPE [overrides]      (under torchrun / srun: one process per rank)
    gaperon plan | preprocess | prepare-sft | submit | convert | evaluate | status | demo-corpus | rehearse ...

`tools/<verb>.py` are the same commands as scripts (the layout is part of the product). Each verb
is imported only when asked for, so `gaperon plan` never imports torch. Bad input in any verb ends
with one `error:` line and exit 2 (megatron_ext.errors).
"""
from __future__ import annotations

import importlib
import signal
import sys

VERBS = {  # verb -> (module, one-line help)
    "train": ("megatron_ext.cli.train", "train from a recipe (one process per rank: torchrun / srun)"),
    "plan": ("megatron_ext.cli.plan", "memory, FLOPs and step time of a recipe; layout search"),
    "preprocess": ("megatron_ext.cli.preprocess", "documents -> indexed datasets; merge parts; train a tokenizer"),
    "prepare-sft": ("megatron_ext.cli.prepare_sft", "chat conversations -> SFT data with loss masks"),
    "submit": ("megatron_ext.cli.submit", "submit training, chains, sweeps and preprocessing to SLURM"),
    "convert": ("megatron_ext.convert", "to-hf / from-hf / verify"),
    "evaluate": ("megatron_ext.evaluate", "lm-eval on an export or a checkpoint, offline"),
    "status": ("megatron_ext.status", "where a run stands, from its files"),
    "demo-corpus": ("megatron_ext.cli.demo_corpus", "write the offline fr/en/code demo corpus"),
    "rehearse": ("megatron_ext.rehearse", "every rank of a layout at full width on one CPU: checkpoint, resume, data"),
}
QUIET_PIPE = {"plan", "status"}  # `gaperon plan ... | head` ends quietly


def run(verb: str, argv: list[str] | None = None) -> None:
    """Run one verb with `argv` (default: the process's arguments) and exit with its code."""
    if verb in QUIET_PIPE:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    module = importlib.import_module(VERBS[verb][0])
    sys.exit(module.main(sys.argv[1:] if argv is None else argv))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        width = max(map(len, VERBS))
        usage = "usage: gaperon VERB [args]   (gaperon VERB --help)\n\n" + "\n".join(
            f"  {v:<{width}}  {help_}" for v, (_, help_) in VERBS.items())
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown verb {argv[0]!r}; one of: {', '.join(VERBS)}", file=sys.stderr)
            sys.exit(2)
        print(usage)
        sys.exit(0)
    run(argv[0], argv[1:])
