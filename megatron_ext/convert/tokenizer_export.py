"""The tokenizer an export ships: found (the recipe's, or an SFT run's data tokenizer), checked
against the model's vocab, and copied without automatic BOS and with the model's context length."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..config import Recipe
from .names import ConvertError


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


# Tokens that end an assistant turn in the chat formats we know (Llama-3 <|eot_id|> and, for tool
# calls, <|eom_id|>; ChatML <|im_end|>; <|end_of_turn|> / Gemma's <end_of_turn>). generate() and
# vLLM stop at any id of generation_config.json's eos_token_id, so every one the vocab has goes there.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end_of_turn|>", "<end_of_turn>")


@dataclass
class TokenizerInfo:
    files: list[Path]
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    end_of_turn_ids: list[int] = None  # END_OF_TURN_TOKENS the vocab has, in that order
    pad_id: int | None = None  # see :func:`pad_token` (the export's pad policy)
    pad_token: str | None = None

    @property
    def stop_ids(self) -> list[int]:
        """Every id that ends generation: EOS first, then the end-of-turn tokens."""
        out = [] if self.eos_id is None else [self.eos_id]
        return out + [i for i in self.end_of_turn_ids or [] if i not in out]


def _token_ids(path: Path, tokens) -> list[int]:
    """Ids of those of ``tokens`` the tokenizer at ``path`` has (HF tokenizer.json or sentencepiece)."""
    from ..tokenizer import tokenizer_file

    f = tokenizer_file(path)
    if f is None:
        return []
    if f.name == "tokenizer.json":
        from tokenizers import Tokenizer as RustTokenizer

        tok = RustTokenizer.from_file(str(f))
        ids = [tok.token_to_id(t) for t in tokens]
    else:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(f))
        ids = [sp.piece_to_id(t) for t in tokens]
        ids = [i if 0 <= i < sp.get_piece_size() and sp.id_to_piece(i) == t else None for i, t in zip(ids, tokens)]
    return [i for i in ids if i is not None]


# Pad tokens a vocab may already have, in order of preference (Llama-3.1/3.2's reserved
# <|finetune_right_pad_id|> first). None of them: EOS pads (see pad_token).
PAD_TOKENS = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|padding|>")


def pad_token(path: Path, eos_id: int | None, model_vocab: int) -> tuple[str | None, int | None]:
    """The export's pad token (name, id): the tokenizer's own ``pad_token`` if it states one that
    the vocab has, else the first of PAD_TOKENS the vocab has, else EOS. Batched ``generate()``
    then pads (on the left) without transformers' "Setting pad_token_id to eos_token_id" warning;
    padded positions are masked out, so which id pads changes no output."""
    from ..tokenizer import _hf_special, tokenizer_file

    own = _hf_special(path, "pad_token") if path.is_dir() else None
    for name in ([own] if own else []) + list(PAD_TOKENS):
        ids = _token_ids(path, [name])
        if ids and ids[0] < model_vocab:
            return name, ids[0]
    if eos_id is None:
        return None, None
    f = tokenizer_file(path)
    if f is not None and f.name == "tokenizer.json":
        from tokenizers import Tokenizer as RustTokenizer

        return RustTokenizer.from_file(str(f)).id_to_token(eos_id), eos_id
    return None, eos_id


def _strip_bos(processor, bos_id: int) -> bool:
    """Remove BOS from a tokenizer.json post_processor (TemplateProcessing, possibly inside a
    Sequence), in place. True if anything was removed."""
    if not isinstance(processor, dict):
        return False
    if processor.get("type") == "Sequence":
        return any([_strip_bos(p, bos_id) for p in processor.get("processors", [])])
    if processor.get("type") != "TemplateProcessing":
        return False
    specials = processor.get("special_tokens", {})
    bos = {name for name, v in specials.items() if v.get("ids") == [bos_id]}
    if not bos:
        return False
    changed = False
    for key in ("single", "pair"):
        kept = [p for p in processor.get(key, []) if p.get("SpecialToken", {}).get("id") not in bos]
        changed |= len(kept) != len(processor.get(key, []))
        processor[key] = kept
    for name in bos:
        specials.pop(name)
    return changed


def export_tokenizer_files(tok: TokenizerInfo, dst: Path, model_max_length: int) -> list[str]:
    """Copy the tokenizer into ``dst`` as the model was trained with it; returns the names written.

    * No automatic BOS: pretraining documents are ``encode(text) + [EOS]`` with no BOS
      (preprocess.py) and SFT conversations get theirs from the chat template (``bos_token``),
      rendered without special tokens (sft.py). So ``tokenizer(text)`` must add none either:
      BOS is removed from tokenizer.json's post-processor and ``add_bos_token`` is false;
      ``apply_chat_template`` still starts with exactly one BOS.
    * ``model_max_length`` is the model's context, not the tokenizer's training config's.
    Every other byte of the files is copied as is."""
    names = []
    for f in tok.files:
        name = "tokenizer.model" if f.suffix == ".model" else f.name
        if name == "tokenizer.json" and tok.bos_id is not None:
            data = json.loads(f.read_text(encoding="utf-8"))
            if _strip_bos(data.get("post_processor"), tok.bos_id):
                (dst / name).write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
                names.append(name)
                continue
        if name == "tokenizer_config.json":
            continue
        shutil.copyfile(f, dst / name)
        names.append(name)
    src_cfg = next((f for f in tok.files if f.name == "tokenizer_config.json"), None)
    cfg = json.loads(src_cfg.read_text(encoding="utf-8")) if src_cfg else {}
    cfg.update(model_max_length=int(model_max_length), add_bos_token=False, add_eos_token=False)
    if tok.pad_token is not None:
        cfg["pad_token"] = tok.pad_token
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    return names + ["tokenizer_config.json"]


def inspect_tokenizer(path: str | Path, model_vocab: int) -> TokenizerInfo:
    from ..tokenizer import load_tokenizer

    p = Path(path)
    try:
        tok = load_tokenizer(p)
    except (FileNotFoundError, ValueError) as err:
        raise ConvertError(f"tokenizer {p}: {err}") from None
    if tok.vocab_size > model_vocab:
        raise ConvertError(f"tokenizer {p} has {tok.vocab_size:,} tokens but the model's vocab is "
                           f"{model_vocab:,}: ids >= {model_vocab:,} have no embedding row. Use the "
                           "tokenizer the model was trained with")
    if p.is_file():
        files = [p]
    else:
        files = [p / n for n in TOKENIZER_FILES if (p / n).is_file()]
    eot = [i for i in _token_ids(p, END_OF_TURN_TOKENS) if i < model_vocab]
    pad_name, pad_id = pad_token(p, tok.eos_id, model_vocab)
    return TokenizerInfo(files, tok.vocab_size, tok.bos_id, tok.eos_id, eot, pad_id, pad_name)


def sft_data_tokenizer(recipe: Recipe) -> str:
    """The tokenizer an SFT run's data was prepared with (its meta.json names it), for a recipe
    without ``data.tokenizer``: an SFT export without its tokenizer has no chat template and no
    BOS/EOS ids, so one that cannot be found is an error, not a silent omission."""
    meta_path = Path(recipe.data.sft_path) / "meta.json"
    try:
        named = json.loads(meta_path.read_text()).get("tokenizer")
    except (OSError, ValueError):
        named = None
    if named and Path(named).exists():
        return named
    why = (f"{meta_path} is not readable here" if named is None
           else f"the tokenizer its data was prepared with ({named}, named in {meta_path}) is not here")
    raise ConvertError(f"this SFT checkpoint's recipe has no data.tokenizer and {why}: pass --tokenizer DIR "
                       "(the tokenizer tools/prepare_sft.py used), so the export gets its chat template and "
                       "BOS/EOS ids")
