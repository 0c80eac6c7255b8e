"""Tokenize chat conversations for SFT.

    python tools/prepare_sft.py chats.jsonl [more.jsonl ...] --tokenizer TOKENIZER_DIR --out data/sft/mix \\
        --seq-len 4096 [--train-on assistant|last_assistant|all] [--overlong truncate|drop] [--strict] [--workers N]

Each JSONL line: {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
(plus any role the chat template names and renders, e.g. Llama-3.1's tool/ipython). Rendered with
the tokenizer's chat template (Llama-3.1 style default when it has none); the loss covers
non-empty assistant turns and the <|eot_id|> that ends each. Message contents are always text:
one that spells <|eot_id|> or a header stays those characters (--allow-special-tokens to let it
become control tokens). The summary gives the fill ratio of packed rows at --seq-len. Writes tokens.bin, loss_mask.bin,
offsets.npy and meta.json (with the summary) to --out; point a recipe's data.sft_path at it.
Unusable records (no assistant turn, unknown role, bad JSON, too long with --overlong drop) are
skipped and counted; --strict stops at the first one instead. Exit status 2 on errors (one line on
stderr naming the file and the fix); inputs and --out are checked before anything is tokenized.
"""
import argparse
import sys
from pathlib import Path

from ..errors import ArgParser
from ..sft import OVERLONG, TRAIN_ON, ConversationError, prepare


def read_template(path: str) -> str:
    """The text of a --chat-template file; ValueError naming the option and the file otherwise."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"--chat-template {path}: no such file; pass a Jinja chat template file, or leave the "
                         "option out to use the tokenizer's template") from None
    except UnicodeDecodeError:
        raise ValueError(f"--chat-template {path}: not UTF-8 text; pass a Jinja chat template file") from None
    except OSError as err:
        raise ValueError(f"--chat-template {path}: cannot be read ({err.strerror}); pass a Jinja chat template "
                         "file") from None


def main(argv=None) -> int:
    p = ArgParser(prog="prepare_sft", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("inputs", nargs="+", help="JSONL files of conversations")
    p.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer directory (tokenizer.json)")
    p.add_argument("--out", required=True, help="output directory (data.sft_path)")
    p.add_argument("--seq-len", type=int, required=True,
                   help="the recipe's train.seq_len; conversations keep at most seq_len + 1 tokens")
    p.add_argument("--train-on", choices=TRAIN_ON, default="assistant",
                   help="tokens with loss: every assistant turn (default), the last one, or all tokens")
    p.add_argument("--overlong", choices=OVERLONG, default="truncate",
                   help="conversations longer than seq_len + 1 tokens: cut (default), cut and take the assistant "
                        "turn the cut falls in out of the loss (truncate_mask_cut), or skip them (drop)")
    p.add_argument("--chat-template", help="a Jinja chat template file, overriding the tokenizer's")
    p.add_argument("--strict", action="store_true", help="fail on the first unusable record instead of skipping it")
    p.add_argument("--workers", type=int, default=1, help="encoding processes (same output for any number)")
    p.add_argument("--allow-special-tokens", action="store_true",
                   help="let message contents that spell control tokens (<|eot_id|>, headers) become them")
    args = p.parse_args(argv)
    try:
        template = read_template(args.chat_template) if args.chat_template else None
        summary = prepare(args.inputs, args.tokenizer, args.out, args.seq_len, args.train_on, args.overlong,
                          template, args.strict, args.workers, args.allow_special_tokens,
                          chat_template_file=args.chat_template)
    except (ConversationError, ValueError, OSError) as err:  # OSError: an unreadable file, a full disk...
        print("error: " + str(err).replace("\n", " "), file=sys.stderr)
        return 2
    print(f"prepared {args.out} (seq_len {args.seq_len}, train_on {args.train_on}, overlong {args.overlong})")
    for line in summary.lines():
        print("  " + line)
    return 0
