"""The command line (tools/convert_checkpoint.py): to-hf, from-hf and verify, and their exit codes."""
from __future__ import annotations

import shlex
import sys

from ..errors import ArgParser, GaperonError, report
from .from_hf import from_hf
from .names import ConvertError
from .to_hf import to_hf
from .verify import verify


def build_parser():

    p = ArgParser(
        prog="convert_checkpoint.py",
        description="Convert between our training checkpoints and Hugging Face directories "
                    "(LlamaForCausalLM, Qwen3ForCausalLM, Olmo2ForCausalLM).")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-hf", help="training checkpoint (any TP/PP/ZeRO layout) -> HF directory")
    a.add_argument("ckpt", help="checkpoint dir, a run's checkpoints/ dir, or a run dir (uses 'latest')")
    a.add_argument("out", help="output directory (new or empty, unless --overwrite)")
    a.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default="bf16", help="weight dtype (default bf16)")
    a.add_argument("--shard-size", default="5GB", help="max bytes per safetensors shard (default 5GB)")
    a.add_argument("--tokenizer", help="tokenizer dir (or .model file) to copy; default: the recipe's data.tokenizer "
                                       "(or the one its phases started from)")
    a.add_argument("--no-tokenizer", action="store_true",
                   help="export the weights only (bos/eos/pad ids still from the recipes' tokenizer when there is one)")
    a.add_argument("--card", choices=["auto", "none"], default="auto",
                   help="auto: write the model card README.md (default); none: skip it")
    a.add_argument("--overwrite", action="store_true", help="replace the files this writes in a non-empty OUT")
    a.add_argument("--no-verify", action="store_true", help="skip the final logits check")
    a.add_argument("--verify-layers", type=int, default=2, help="layers the final check runs (default 2; 0 = all)")
    a.add_argument("--no-progress", action="store_true")
    b = sub.add_parser("from-hf", help="HF directory -> checkpoint in our format (step 0, weights only)")
    b.add_argument("hf_dir")
    b.add_argument("out", help="output checkpoint directory; use it as checkpoint.init_from=OUT")
    b.add_argument("--recipe-name", help="model.name in the derived recipe (default: the HF directory name)")
    b.add_argument("--tp", type=int, default=1, help="tensor-parallel shards to write (default 1)")
    b.add_argument("--pp", type=int, default=1, help="pipeline stages to write (default 1)")
    b.add_argument("--spec", choices=["local", "te"], default="local",
                   help="parameter names of Megatron's local layer spec (default) or Transformer Engine's")
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--no-verify", action="store_true")
    b.add_argument("--verify-layers", type=int, default=2)
    b.add_argument("--no-progress", action="store_true")
    c = sub.add_parser("verify", help="compare the logits of a checkpoint and an HF directory")
    c.add_argument("ckpt")
    c.add_argument("hf_dir")
    c.add_argument("--layers", type=int, default=0, help="compare only the first K layers (default 0 = all)")
    c.add_argument("--vocab-rows", type=int, default=0, help="logits on the first N vocab rows only (0 = all)")
    c.add_argument("--tol", type=float, default=1e-3, help="max abs diff allowed, x max(1, max |logit|)")
    c.add_argument("--seqs", type=int, default=3)
    c.add_argument("--seq-len", type=int, default=32)
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 1 verification failed, 2 bad input (the message says which and why)."""
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "to-hf":
            if args.tokenizer and args.no_tokenizer:
                raise ConvertError("--tokenizer and --no-tokenizer contradict each other: give one")
            to_hf(args.ckpt, args.out, dtype=args.dtype, shard_size=args.shard_size, tokenizer=args.tokenizer,
                  overwrite=args.overwrite, verify_layers=None if args.no_verify else args.verify_layers,
                  progress=not args.no_progress, no_tokenizer=args.no_tokenizer, card=args.card,
                  command=shlex.join(["python", "tools/convert_checkpoint.py", *(argv if argv is not None
                                                                                  else sys.argv[1:])]))
        elif args.cmd == "from-hf":
            from_hf(args.hf_dir, args.out, tp=args.tp, pp=args.pp, recipe_name=args.recipe_name,
                    overwrite=args.overwrite, spec=args.spec,
                    verify_layers=None if args.no_verify else args.verify_layers, progress=not args.no_progress)
        else:
            result = verify(args.ckpt, args.hf_dir, layers=args.layers or None, vocab_rows=args.vocab_rows or None,
                            num_seqs=args.seqs, seq_len=args.seq_len, tol=args.tol)
            print(result, flush=True)
            return 0 if result.ok else 1
    except GaperonError as err:  # bad input: 2; a failed verification: 1 (VerifyError.exit_code)
        return report(err)
    except OSError as err:  # an unwritable output path, a full disk: nothing was moved into place
        print(f"error: {err.filename or ''}: {err.strerror or err}: choose a writable output directory with "
              "free space (nothing was written there)", file=sys.stderr, flush=True)
        return 2
    return 0
