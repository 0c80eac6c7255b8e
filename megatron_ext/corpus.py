"""The demo corpus: real French, English and code text that a fresh Debian + Python machine already
holds, so the demo and the tests need no download.

- code: the Python standard library's ``.py`` files (tests excluded).
- en: the Python language reference (``pydoc_data.topics``, shipped with CPython), the licence
  texts of Debian's base-files (/usr/share/common-licenses), then English man pages.
- fr: French man pages (/usr/share/man/fr: apt, dpkg, shadow, adduser... ship them), then the
  French message catalogs of the base system (/usr/share/locale/fr/LC_MESSAGES/*.mo: coreutils,
  bash, apt, dpkg, tar, libc ... their long --help texts are real French prose).
  Slim Docker images drop /usr/share/{man,locale} (dpkg path-exclude); there, install the Debian
  package ``manpages-fr`` after removing that exclusion, or point ``french_roots`` elsewhere.

Files are taken in sorted order up to a byte budget per language, so two runs on the same machine
write identical files.
"""
from __future__ import annotations

import codecs
import gzip
import json
import re
import struct
import sysconfig
import unicodedata
from pathlib import Path
from typing import Iterator

MAN_EN = [Path("/usr/share/man") / f"man{s}" for s in (1, 5, 7, 8)]
MAN_FR = Path("/usr/share/man/fr")
LOCALE_FR = Path("/usr/share/locale/fr/LC_MESSAGES")
LICENSES = Path("/usr/share/common-licenses")
DOC_BYTES = 16_384  # documents are cut at paragraph breaks into pieces of about this size


# ----------------------------------------------------------------------------- roff (man pages)

_ACCENTS = {"'": "\u0301", "`": "\u0300", "^": "\u0302", ":": "\u0308", ",": "\u0327", "~": "\u0303", "o": "\u030a"}
_GLYPHS = {
    "aq": "'", "Aq": "'", "dq": '"', "lq": "\u201c", "rq": "\u201d", "oq": "\u2018", "cq": "\u2019",
    "em": "\u2014", "en": "\u2013", "hy": "-", "mi": "-", "pl": "+", "eq": "=", "bu": "\u2022",
    "Fo": "\u00ab", "Fc": "\u00bb", "fo": "\u2039", "fc": "\u203a", "co": "\u00a9", "rg": "\u00ae",
    "tm": "\u2122", "oe": "\u0153", "OE": "\u0152", "ae": "\u00e6", "AE": "\u00c6", "ss": "\u00df",
    "ga": "`", "ha": "^", "ti": "~", "rs": "\\", "sl": "/", "ba": "|", "or": "|", "ul": "_",
    "lB": "[", "rB": "]", "lC": "{", "rC": "}", "at": "@", "sh": "#", "Do": "$", "de": "\u00b0",
    "<=": "\u2264", ">=": "\u2265", "->": "\u2192", "<-": "\u2190", "mu": "\u00d7", "di": "\u00f7",
    "+-": "\u00b1", "eu": "\u20ac", "Eu": "\u20ac", "sc": "\u00a7", "ps": "\u00b6", "dg": "\u2020",
    "r!": "\u00a1", "r?": "\u00bf", "Po": "\u00a3", "ct": "\u00a2", "pc": "\u00b7", "tq": '"',
}
_CHARS = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": "\t", "'": "'", "`": "`",
          ".": ".", "(": "(", ")": ")"}
_ESCAPE = re.compile(r"""\\(?:
      \((?P<g2>..) | \[(?P<gl>[^\]]*)\]
    | \*(?:\((?P<s2>..)|\[(?P<sl>[^\]]*)\]|(?P<s1>.))
    | [fF](?:\(..|\[[^\]]*\]|.)
    | s(?:[-+]?\d|[-+]?\(\d\d|\[[^\]]*\])
    | [nN][-+]?(?:\(..|\[[^\]]*\]|.)
    | [wbhvDlLoxXZkYVRA]'[^']*'
    | (?P<ch>.) )""", re.X)
_BREAKS = {"SH", "SS", "PP", "LP", "P", "TP", "TQ", "IP", "HP", "sp", "br", "RS", "RE", "in", "ti", "EX", "EE",
           "UR", "UE", "MT", "ME", "SY", "YS", "bp", "ne"}
_TEXT_MACROS = {"SH", "SS", "B", "I", "SM", "SB", "BR", "IR", "RB", "RI", "BI", "IB", "OP", "SY", "UR", "MT"}


def _glyph(name: str) -> str:
    if name in _GLYPHS:
        return _GLYPHS[name]
    if len(name) == 2 and name[0] in _ACCENTS:
        return unicodedata.normalize("NFC", name[1] + _ACCENTS[name[0]])
    if re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):
        return chr(int(name[1:], 16))
    return ""


def _unescape(line: str) -> str:
    def sub(m: re.Match) -> str:
        if m["g2"] is not None or m["gl"] is not None:
            return _glyph(m["g2"] or m["gl"])
        if m["s2"] is not None or m["sl"] is not None or m["s1"] is not None:
            return _GLYPHS.get(m["s2"] or m["sl"] or m["s1"], "")
        if m["ch"] is not None:
            return _CHARS.get(m["ch"], "")
        return ""  # fonts, sizes, registers, motions

    return _ESCAPE.sub(sub, line)


def _macro_args(rest: str) -> list[str]:
    return [a[1:-1] if a.startswith('"') else a for a in re.findall(r'"[^"]*"?|\S+', rest)]


def roff_to_text(source: str) -> str:
    """Readable paragraphs from a man page's roff source: macros become paragraph breaks,
    escapes become characters (accents included), definitions, tables and comments go."""
    paragraphs, current, skip_until = [], [], None

    def flush():
        if current:
            text = re.sub(r"[ \t]+", " ", " ".join(current)).strip()
            if text:
                paragraphs.append(text)
            current.clear()

    for raw in source.splitlines():
        if skip_until is not None:
            if raw.strip().startswith(skip_until) or (skip_until == "\\}" and "\\}" in raw):
                skip_until = None
            continue
        line = re.sub(r'\\".*$|\\#.*$', "", raw)
        if line[:1] in (".", "'"):
            name, _, rest = line[1:].strip().partition(" ")
            if name in ("de", "de1", "ig", "am"):
                skip_until = ".."
            elif name == "TS":
                skip_until = ".TE"
            elif "\\{" in line and "\\}" not in line:
                skip_until = "\\}"
            if name in _BREAKS:
                flush()
            if name in _TEXT_MACROS and rest.strip():
                joiner = "" if len(name) == 2 and name not in ("SH", "SS", "SM", "SB", "OP", "SY", "UR", "MT") else " "
                current.append(_unescape(joiner.join(_macro_args(rest))))
                if name in ("SH", "SS"):
                    flush()
            continue
        if not line.strip():
            flush()
            continue
        current.append(_unescape(line))
    flush()
    return "\n\n".join(paragraphs)


def _man_pages(roots) -> Iterator[tuple[str, str]]:
    seen = set()  # pages linked under several names come once
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            opener = gzip.open if path.suffix == ".gz" else open
            try:
                with opener(path, "rb") as f:
                    source = f.read().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            if re.match(r"\.so\s", source):  # a link to another page
                continue
            text = roff_to_text(source)
            if text:
                yield f"man:{path.relative_to(root.parent)}", text


# ------------------------------------------------------------------------ gettext message catalogs

def read_mo(path: Path) -> list[tuple[str, str]]:
    """(msgid, msgstr) pairs of a GNU .mo catalog, header entry excluded."""
    data = path.read_bytes()
    order = "<" if data[:4] == b"\xde\x12\x04\x95" else ">"
    count, ids_at, strs_at = struct.unpack(order + "3I", data[8:20])

    def entry(table: int, i: int) -> bytes:
        length, offset = struct.unpack(order + "2I", data[table + 8 * i: table + 8 * i + 8])
        return data[offset: offset + length]

    pairs = [(entry(ids_at, i), entry(strs_at, i)) for i in range(count)]
    header = next((s for k, s in pairs if k == b""), b"").decode("ascii", "replace")
    match = re.search(r"charset=([\w-]+)", header)
    charset = match[1] if match else "utf-8"
    try:
        codecs.lookup(charset)
    except LookupError:
        charset = "utf-8"
    out = []
    for key, value in pairs:
        if key:
            # plural forms are NUL-separated variants; keep each
            out += [(key.decode(charset, "replace"), v) for v in value.decode(charset, "replace").split("\0")]
    return out


def _catalogs(directory: Path) -> Iterator[tuple[str, str]]:
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("*.mo")):
        if path.name.startswith("iso_"):  # lists of country and language names, not prose
            continue
        texts = [v.strip() for k, v in read_mo(path) if v.strip() and v != k and re.search(r"[^\W\d_]{3}", v)]
        if texts:
            yield f"locale:fr/{path.name}", "\n\n".join(texts)


# ------------------------------------------------------------------------------------------ sources

def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def code_docs() -> Iterator[tuple[str, str]]:
    root = _stdlib_dir()
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip & set(rel.parts) or path.stat().st_size > 200_000:
            continue
        try:
            yield f"stdlib:{rel.as_posix()}", path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue


def english_docs() -> Iterator[tuple[str, str]]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"pydoc:{name}", topics[name]
    if LICENSES.is_dir():
        seen = set()
        for path in sorted(LICENSES.iterdir()):
            if path.is_file() and path.resolve() not in seen:
                seen.add(path.resolve())
                yield f"license:{path.name}", path.read_text(encoding="utf-8", errors="replace")
    yield from _man_pages(MAN_EN)


def french_docs(french_roots=(MAN_FR,), catalogs=LOCALE_FR) -> Iterator[tuple[str, str]]:
    yield from _man_pages([Path(r) for r in french_roots])
    yield from _catalogs(Path(catalogs))


def _pieces(text: str, limit: int = DOC_BYTES) -> Iterator[str]:
    """Cut at paragraph breaks into pieces of about ``limit`` characters (a longer paragraph stays whole)."""
    piece = []
    size = 0
    for para in text.split("\n\n"):
        if piece and size + len(para) > limit:
            yield "\n\n".join(piece)
            piece, size = [], 0
        piece.append(para)
        size += len(para) + 2
    if piece:
        yield "\n\n".join(piece)


def write_jsonl(docs: Iterator[tuple[str, str]], path: Path, max_bytes: int) -> tuple[int, int]:
    """Write ``{"text", "source"}`` lines until ``max_bytes`` of UTF-8 text; returns (docs, bytes)."""
    n = size = 0
    with open(path, "w", encoding="utf-8") as f:
        for source, text in docs:
            for i, piece in enumerate(_pieces(text)):
                if not piece.strip():
                    continue
                f.write(json.dumps({"text": piece, "source": f"{source}#{i}"}, ensure_ascii=False) + "\n")
                n += 1
                size += len(piece.encode("utf-8"))
                if size >= max_bytes:
                    return n, size
    return n, size


def build_demo_corpus(out_dir, max_bytes_per_lang: int = 4 << 20) -> dict[str, Path]:
    """Write ``en.jsonl``, ``fr.jsonl`` and ``code.jsonl`` under ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for lang, docs in (("en", english_docs()), ("fr", french_docs()), ("code", code_docs())):
        paths[lang] = out / f"{lang}.jsonl"
        n, _ = write_jsonl(docs, paths[lang], max_bytes_per_lang)
        if n == 0:
            hint = (" French comes from /usr/share/man/fr and /usr/share/locale/fr; on an image that excludes them "
                    "(dpkg path-exclude), install the Debian package manpages-fr without that exclusion."
                    if lang == "fr" else "")
            raise RuntimeError(f"demo corpus: no {lang} text found on this machine.{hint}")
    return paths
