"""A faster encoder for Llama-3-style byte-level BPE tokenizers, read from the same tokenizer.json.

Why: Hugging Face ``tokenizers`` builds a full ``Encoding`` per call (offsets, token strings,
masks), which is most of its cost. Llama-3's tokenizer is a regex split followed by a lookup of
each piece in the vocabulary (``ignore_merges``), and natural text repeats its pieces: one
``regex.findall`` plus a dictionary hit per piece gives the same ids about 3x faster per CPU.

It is used only for exactly that pipeline (no normalizer; Split(regex, isolated) then ByteLevel
without its own regex; BPE without dropout, prefixes/suffixes or byte fallback; every added token
special, so that with ``encode_special_tokens`` none is matched in text), and only after
:func:`verify` found its ids equal to the HF tokenizer's on adversarial text and a sample of the
data. Anything else, or any disagreement, falls back to HF tokenizers.
"""
from __future__ import annotations

import json
from pathlib import Path

# Text the check on load always includes: special-token strings, whitespace runs of every kind,
# contractions in odd cases, digit runs, emoji (with joiners and modifiers), combining marks,
# control characters, CJK, RTL, and long repeats.
ADVERSARIAL = [
    "<|end_of_text|> <|begin_of_text|><|eot_id|>x<|start_header_id|>", "<|reserved_special_token_0|>",
    "", " ", "  ", "\n", "\r\n", "\n\n\n", " \n \n", "\t\t x", "a  \t b", "   trailing   ", "\u00a0\u2009\u3000 x",
    "\x0b\x0c\x1c\x1d\x1e\x1f\x85 y", "\u2028\u2029 z", "\u200b\u200d\ufeff", "I'M YOU'RE we'Ll it'S 'ſ 'K",
    "1234567 12.5e-3 ١٢٣٤ ⅷ ²³", "😀👍🏽👨‍👩‍👧‍👦🇫🇷 🍮", "e\u0301 n\u0303 \u0300\u0301",
    "\x00\x01\x7f control", "中文字符 日本語のテキスト 한국어", "עברית العربية", "a" * 300,
    "ab" * 200 + " " * 100 + "\n" * 50, "def f(x):\n    return x  # 123\n\n\tpass\r\n", "€$£¥ ©®™ «»‹›",
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which ByteLevel uses to name byte tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def unsupported(spec: dict) -> str | None:
    """Why this tokenizer.json is not the pipeline the fast encoder reproduces, or None."""
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if spec.get("normalizer") is not None:
        return "it has a normalizer"
    if len(steps) != 2 or steps[0].get("type") != "Split" or steps[1].get("type") != "ByteLevel":
        return "its pre-tokenizer is not Split(regex) + ByteLevel"
    split, level = steps
    if "Regex" not in split.get("pattern", {}) or split.get("behavior") != "Isolated" or split.get("invert"):
        return "its Split is not an isolated regex split"
    if level.get("add_prefix_space") or level.get("use_regex"):
        return "its ByteLevel adds a prefix space or splits by its own regex"
    if model.get("type") != "BPE" or model.get("dropout") or model.get("continuing_subword_prefix") \
            or model.get("end_of_word_suffix") or model.get("byte_fallback"):
        return "its model is not plain byte-level BPE"
    if not all(t.get("special") for t in spec.get("added_tokens", [])):
        return "it has non-special added tokens (matched in text)"
    vocab = model.get("vocab", {})
    if not all(c in vocab for c in bytes_to_unicode().values()):
        return "its vocabulary lacks some byte tokens"
    return None


class FastBPE:
    """ids = concat(piece_ids(p) for p in regex.findall(pattern, text)), piece ids cached."""

    CACHE_LIMIT = 1 << 20  # pieces; cleared when full, so memory stays bounded on any data

    def __init__(self, spec: dict):
        import regex

        self._pattern = regex.compile(spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"])
        model = spec["model"]
        self._vocab: dict[str, int] = model["vocab"]
        self._merges = model.get("merges", [])
        self._ranks_cache: dict[tuple[str, str], int] | None = None  # built on the first piece BPE merges
        self._ignore_merges = bool(model.get("ignore_merges"))
        self._to_level = str.maketrans({chr(b): c for b, c in bytes_to_unicode().items()})
        self._single: dict[str, int] = {}   # piece -> its one id (most pieces)
        self._multi: dict[str, list[int]] = {}

    @classmethod
    def from_file(cls, path: str | Path) -> tuple["FastBPE | None", str | None]:
        """(encoder, None), or (None, why not)."""
        spec = json.loads(Path(path).read_text(encoding="utf-8"))
        why = unsupported(spec)
        return (None, why) if why else (cls(spec), None)

    @property
    def _ranks(self) -> dict[tuple[str, str], int]:
        if self._ranks_cache is None:
            self._ranks_cache = {tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m): rank
                                 for rank, m in enumerate(self._merges)}
        return self._ranks_cache

    def _bpe(self, word: str) -> list[int]:
        """Merge the pair of lowest rank (leftmost among equals) until none applies, as HF's BPE."""
        if self._ignore_merges and word in self._vocab:
            return [self._vocab[word]]
        symbols, ranks = list(word), self._ranks
        while len(symbols) > 1:
            best, at = None, -1
            for i in range(len(symbols) - 1):
                rank = ranks.get((symbols[i], symbols[i + 1]))
                if rank is not None and (best is None or rank < best):
                    best, at = rank, i
            if best is None:
                break
            symbols[at:at + 2] = [symbols[at] + symbols[at + 1]]
        return [self._vocab[s] for s in symbols]

    def _slow(self, piece: str) -> list[int]:
        ids = self._bpe(piece.encode("utf-8").decode("latin-1").translate(self._to_level))
        if len(self._single) + len(self._multi) > self.CACHE_LIMIT:
            self._single.clear()
            self._multi.clear()
        if len(ids) == 1:
            self._single[piece] = ids[0]
        else:
            self._multi[piece] = ids
        return ids

    def _pieces(self, text: str) -> list[str]:
        pieces = self._pattern.findall(text)
        if sum(map(len, pieces)) == len(text):
            return pieces
        out, pos = [], 0  # some text matched nothing: Isolated keeps it as its own piece
        for m in self._pattern.finditer(text):
            if m.start() > pos:
                out.append(text[pos:m.start()])
            out.append(m.group())
            pos = m.end()
        if pos < len(text):
            out.append(text[pos:])
        return out

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        single, multi = self._single.get, self._multi.get
        for piece in self._pieces(text):
            i = single(piece)
            if i is not None:
                out.append(i)
                continue
            ids = multi(piece)
            out.extend(ids if ids is not None else self._slow(piece))
        return out


def first_difference(fast: FastBPE, reference, texts) -> str | None:
    """The first text (abbreviated) whose ids differ between the two encoders, or None."""
    for text in texts:
        if fast.encode(text) != reference(text):
            return repr(text[:60])
    return None
