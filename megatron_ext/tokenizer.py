"""Tokenizers: load a local one (HF directory or sentencepiece model), or train a small one.

Everything here is offline: a path is read from disk, never resolved against a hub. The wrapper
exposes only what preprocessing and training need (vocab size, EOS/BOS ids, encode/decode); the HF
object stays reachable as ``.hf`` for chat templates in SFT.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from .readers import iter_texts

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
CHAT_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
SPECIAL_TOKENS = [BOS, EOS, *CHAT_TOKENS]

# Llama-3's pre-tokenizer split: contractions, letter runs, numbers in groups of <= 3 digits,
# punctuation runs, newlines, other whitespace. Training with the same split keeps our small
# tokenizers behaving like the production one (e.g. on digits and code indentation).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# Llama-3 style chat template, so SFT code written against the production tokenizer runs on ours.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


class Tokenizer:
    """Thin common face over a ``tokenizers.Tokenizer`` or a ``SentencePieceProcessor``.

    ``encode`` never adds special tokens, nor reads special-token text in a document as control
    tokens: document boundaries are the preprocessor's business.
    """

    def __init__(self, path: str, vocab_size: int, eos_id: int, bos_id: int | None, encode, decode,
                 hf_loader=None, json_file: Path | None = None):
        self.path, self.vocab_size, self.eos_id, self.bos_id = path, vocab_size, eos_id, bos_id
        self._encode, self._decode, self._hf_loader, self._hf = encode, decode, hf_loader, None
        self.json_file = json_file  # tokenizer.json of an HF tokenizer (what fast_encoder reads)

    def encode(self, text: str) -> list[int]:
        return self._encode(text)

    def decode(self, ids) -> str:
        return self._decode([int(i) for i in ids])

    @property
    def hf(self):
        """The transformers tokenizer (loaded on first use: importing transformers costs seconds)."""
        if self._hf is None and self._hf_loader is not None:
            self._hf = self._hf_loader()
        return self._hf

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, bos_id={self.bos_id})"


def _token_name(value) -> str | None:
    """tokenizer_config.json stores special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _hf_special(directory: Path, key: str) -> str | None:
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        f = directory / name
        if f.is_file():
            try:
                config = json.loads(f.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise ValueError(f"{f}: not valid JSON ({_one_line(err)}): a truncated or damaged copy? "
                                 "copy the tokenizer again.") from None
            value = _token_name(config.get(key)) if isinstance(config, dict) else None
            if value:
                return value
    return None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _load_hf(directory: Path, eos_token: str | None) -> Tokenizer:
    from tokenizers import Tokenizer as RustTokenizer

    try:
        tok = RustTokenizer.from_file(str(directory / "tokenizer.json"))
    except Exception as err:  # the Rust library raises a bare Exception for unreadable JSON
        raise ValueError(f"{directory / 'tokenizer.json'}: cannot be read as a Hugging Face tokenizer "
                         f"({_one_line(err)}): a truncated or damaged copy? copy the tokenizer again.") from None
    # Raw documents are text: a literal "<|end_of_text|>" in a web page must not become a real EOS.
    # (Chat templates go through ``.hf``, which does match special tokens.)
    tok.encode_special_tokens = True
    eos_name = eos_token or _hf_special(directory, "eos_token")
    candidates = [eos_name] if eos_name else [EOS, "</s>", "<|endoftext|>", "<eos>"]
    eos_id = next((tok.token_to_id(c) for c in candidates if c and tok.token_to_id(c) is not None), None)
    if eos_id is None:
        raise ValueError(f"{directory}: no end-of-document token found (tried {candidates}); pass eos_token=")
    bos_name = _hf_special(directory, "bos_token")
    bos_id = tok.token_to_id(bos_name) if bos_name else None

    def hf_loader():
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)

    return Tokenizer(str(directory), tok.get_vocab_size(with_added_tokens=True), eos_id, bos_id,
                     lambda text: tok.encode(text, add_special_tokens=False).ids,
                     lambda ids: tok.decode(ids, skip_special_tokens=False), hf_loader, directory / "tokenizer.json")


def _load_sentencepiece(model_file: Path) -> Tokenizer:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
    except Exception as err:  # OSError or RuntimeError, depending on what is wrong with the file
        raise ValueError(f"{model_file}: cannot be read as a sentencepiece model ({_one_line(err)}): "
                         "a truncated or damaged copy? copy the tokenizer again.") from None
    if sp.eos_id() < 0:
        raise ValueError(f"{model_file}: the sentencepiece model has no EOS piece")
    return Tokenizer(str(model_file), sp.get_piece_size(), sp.eos_id(), sp.bos_id() if sp.bos_id() >= 0 else None,
                     lambda text: sp.encode(text), lambda ids: sp.decode(ids))


def load_tokenizer(path: str | os.PathLike, eos_token: str | None = None) -> Tokenizer:
    """A local HF tokenizer directory (with tokenizer.json), a sentencepiece ``.model`` file, or a
    directory holding only ``tokenizer.model``. ``eos_token`` overrides the configured EOS (e.g. to
    separate documents with ``<|end_of_text|>`` when an instruct config says ``<|eot_id|>``)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such tokenizer (the path does not exist); expected a directory with "
                                "tokenizer.json (Hugging Face) or a sentencepiece .model file. Nothing is downloaded: "
                                "copy the tokenizer here first.")
    if p.is_dir() and (p / "tokenizer.json").is_file():
        return _load_hf(p, eos_token)
    if p.is_dir() and (p / "tokenizer.model").is_file():
        return _load_sentencepiece(p / "tokenizer.model")
    if p.is_file() and p.suffix == ".model":
        return _load_sentencepiece(p)
    raise FileNotFoundError(f"{p}: not a tokenizer; expected a directory with tokenizer.json (Hugging Face) "
                            "or a sentencepiece .model file. Nothing is downloaded: copy the tokenizer here first.")


def fast_encoder(tok: Tokenizer, sample=()):
    """(encode, None) where megatron_ext.fast_bpe reproduces ``tok.encode`` exactly on its adversarial
    texts and on ``sample`` (documents of the data at hand), else (None, why not)."""
    from .fast_bpe import ADVERSARIAL, FastBPE, first_difference

    if tok.json_file is None:
        return None, "not a Hugging Face tokenizer.json"
    fast, why = FastBPE.from_file(tok.json_file)
    if fast is None:
        return None, why
    differs = first_difference(fast, tok.encode, [*ADVERSARIAL, *sample])
    if differs:
        return None, f"its ids differ from Hugging Face tokenizers' on {differs}"
    return fast.encode, None


def check_vocab_fits(tokenizer_vocab: int, model_vocab: int) -> None:
    """Token ids at or above the model's vocab would index past the embedding table (a CUDA
    device-side assert deep in training, an IndexError at step 1 on CPU, or silent training of
    padding rows when the padded embedding happens to cover them); refuse them before any work."""
    if tokenizer_vocab > model_vocab:
        raise ValueError(
            f"tokenizer has {tokenizer_vocab:,} tokens but the model vocab is {model_vocab:,}: ids >= "
            f"{model_vocab:,} would fall outside the model's vocabulary. Fix: set model.vocab_size to at least "
            f"{tokenizer_vocab:,} (the tokenizer's size) in the recipe, or preprocess with a tokenizer of at "
            f"most {model_vocab:,} tokens.")


def tokenizer_file(path: str | os.PathLike) -> Path | None:
    """The file that defines a tokenizer's ids (tokenizer.json or the sentencepiece model), if any."""
    p = Path(path)
    for candidate in (p / "tokenizer.json", p / "tokenizer.model", p):
        if candidate.is_file() and (candidate.name == "tokenizer.json" or candidate.suffix == ".model"):
            return candidate
    return None


def tokenizer_fingerprint(path: str | os.PathLike) -> str | None:
    """sha256 of the file that defines the tokenizer's ids (a few ms even for Llama-3's 9 MB), so
    data can record which tokenizer made it; None when there is no such file."""
    f = tokenizer_file(path)
    if f is None:
        return None
    digest = hashlib.sha256()
    with open(f, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _iter_training_texts(files, text_key: str, max_bytes: int | None) -> Iterable[str]:
    seen = 0
    for text in iter_texts(files, text_key=text_key):
        yield text
        seen += len(text.encode("utf-8"))
        if max_bytes is not None and seen >= max_bytes:
            return


def train_tokenizer(files, out_dir, vocab_size: int, kind: str = "bpe", text_key: str = "text",
                    max_bytes: int | None = None) -> Path:
    """Train a tokenizer on the documents of ``files`` (JSONL, text or Parquet, as for
    preprocessing; bad documents are passed over; at most ``max_bytes`` of text) and write it to
    ``out_dir``. BPE gets exactly ``vocab_size`` tokens, sentencepiece at most that many.
    Returns the path ``load_tokenizer`` accepts."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = _iter_training_texts([str(f) for f in files], text_key, max_bytes)
    if kind == "bpe":
        return _train_bpe(texts, out, vocab_size)
    if kind == "sentencepiece":
        return _train_sentencepiece(texts, out, vocab_size)
    raise ValueError(f"unknown tokenizer kind {kind!r}; use 'bpe' or 'sentencepiece'")


def _train_bpe(texts: Iterable[str], out: Path, vocab_size: int) -> Path:
    """Byte-level BPE laid out like Llama-3: learned tokens first, then the special tokens, then
    reserved specials padding the vocab to exactly ``vocab_size`` (BPE may run out of merges on a
    small sample)."""
    from tokenizers import Regex, Tokenizer as RustTokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} is too small: byte-level BPE needs 256 byte tokens "
                         f"plus {len(SPECIAL_TOKENS)} special tokens")
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.model.ignore_merges = True  # as Llama-3: a word in the vocab is one token, no merge loop (~25% faster)
    tok.add_special_tokens(SPECIAL_TOKENS)
    missing = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([f"<|reserved_special_token_{i}|>" for i in range(missing)])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)])
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "model_max_length": 131072, "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}, indent=2) + "\n",
                                                 encoding="utf-8")
    return out


def _train_sentencepiece(texts: Iterable[str], out: Path, vocab_size: int) -> Path:
    """Sentencepiece BPE with byte fallback (no unknown characters), trained on the documents'
    non-empty lines."""
    import sentencepiece as spm

    def lines():
        for text in texts:
            yield from (line for line in text.splitlines() if line.strip())

    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_prefix=str(out / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=0.9995, hard_vocab_limit=False,
        bos_piece=BOS, eos_piece=EOS, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=CHAT_TOKENS, num_threads=max(1, min(os.cpu_count() or 1, 4)),
        minloglevel=2)
    return out / "tokenizer.model"
