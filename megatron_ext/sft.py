"""Supervised fine-tuning: chat conversations -> token ids + loss masks on disk -> training samples.

Two halves:

* :class:`ChatEncoder` (used by ``tools/prepare_sft.py``) renders a conversation with the
  tokenizer's chat template (Hugging Face ``apply_chat_template``; :data:`DEFAULT_CHAT_TEMPLATE`,
  Llama-3 style, when the tokenizer has none) and marks the tokens to train on. The mask is
  computed on the rendered text, not by guessing token counts: the assistant turn ``i`` is the
  character span between the rendering of ``messages[:i]`` with the generation prompt and the
  rendering of ``messages[:i+1]``, so it holds the reply and whatever the template appends to end
  it (``<|eot_id|>``). A token is trained when it starts inside such a span (tokenizer offsets).
  The template must be append-only (each prefix rendering a prefix of the full one); one that is
  not is refused rather than masked wrongly. Message contents are tokenized apart from the
  template's text, with special tokens off, so no message can spell a control token (their place
  in the rendering is found by rendering once more with markers for the contents).

* :class:`SFTDataset` reads a prepared directory and serves ``{"tokens", "labels", "loss_mask"}``
  samples of ``seq_len`` (plus ``"segment_ids"`` when packing), in an order shuffled per epoch
  from the recipe's seed; packed rows come from packing.pack_rows (best-fit decreasing). A
  conversation of L tokens takes L-1 positions: inputs ``ids[:-1]``, labels ``ids[1:]``. Packed
  conversations therefore never predict across a boundary (the last token of one is only ever a
  label, never an input to the next), and ``segment_ids`` give the engine the document boundaries
  (attention.py: cu_seqlens, or the dense block-diagonal mask). Padding has loss_mask 0.

Prepared directory (format 1)::

    tokens.bin      int32, every conversation's token ids, back to back
    loss_mask.bin   uint8, 1 where the token is a trained target (aligned with tokens.bin)
    offsets.npy     int64 [n + 1], conversation i is tokens[offsets[i]:offsets[i+1]]
    meta.json       format, tokenizer, vocab size, pad id, seq_len, train_on, summary counts
    chat_template.jinja  the template the masks were computed with

Steps: with ``data.epochs`` set, ``train.steps`` is derived from the data by
:func:`packing.steps_for_epochs` (called from ``config.load_recipe``): ceil(epochs x sequences per epoch /
global batch), where a sequence is one conversation (``packing: false``) or one packed row. The
last step may be short: sample indices past the end are all-padding rows that carry no loss, so
nothing is repeated and nothing is dropped.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .errors import GaperonError

from .packing import (FORMAT_VERSION, SFTDataError, _prepare_hint, _too_long, check_prepared,  # noqa: F401
                      epoch_order, epoch_plan, fill_ratio, pack_next_fit, pack_rows, steps_for_epochs)
ROLES = ("system", "user", "assistant")  # every template renders these; others only if it names them
TRAIN_ON = ("assistant", "last_assistant", "all")
# truncate_mask_cut: truncate, and take the assistant turn the cut falls in out of the loss.
OVERLONG = ("truncate", "truncate_mask_cut", "drop")

# Llama-3.1 chat format: <|begin_of_text|> then, per message,
# <|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|> (tool results under the ipython
# header); the generation prompt is the assistant header. Used for tokenizers whose config
# carries no chat_template.
DEFAULT_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set role = 'ipython' if message['role'] in ['tool', 'ipython'] else message['role'] -%}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\n\n' -}}"
    "{{- message['content'] | trim -}}"
    "{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}"
    "{%- endif -%}"
)

# A stand-in for message contents, to find where a template puts them (see _content_spans).
_MARK = "@@GAPERON-MESSAGE-{}@@"
_MARK_RE = re.compile(r"@@GAPERON-MESSAGE-(\d+)@@")
# Role names a template compares against: role == 'tool', role in ['tool', 'ipython'].
_ROLE_EQ = re.compile(r"""role['"\]]*\s*(?:==|!=)\s*['"]([A-Za-z_][\w-]*)['"]""")
_ROLE_IN = re.compile(r"""role['"\]]*\s+(?:not\s+)?in\s*[\[(]([^\])]*)[\])]""")


class ChatTemplateError(GaperonError, ValueError):
    """The chat template itself is unusable (a Jinja syntax error, or it renders no turn): blamed
    once, naming the template (and the line), not every record."""


PREPARED_FILES = frozenset({"tokens.bin", "loss_mask.bin", "offsets.npy", "meta.json", "chat_template.jinja",
                            "tokens.bin.tmp", "loss_mask.bin.tmp"})
_PROBE = [{"role": "user", "content": "gaperon probe question"},
          {"role": "assistant", "content": "gaperon probe answer"}]


def check_template(encoder: "ChatEncoder", origin: str) -> None:
    """Refuse a template that cannot work for any record, before a record is read: a Jinja syntax
    error (with its line), or one that does not render a plain user + assistant conversation into
    text holding the answer with tokens to train on."""
    from jinja2 import TemplateSyntaxError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]).parse(
            encoder.chat_template)
    except TemplateSyntaxError as err:
        raise ChatTemplateError(f"{origin}: Jinja syntax error at line {err.lineno}: {err.message}; fix the "
                                "template") from None
    max_tokens, encoder.max_tokens = encoder.max_tokens, None  # the probe is short, but --seq-len may be shorter
    try:
        text = encoder.render(_PROBE)
        if _PROBE[1]["content"] not in text:
            raise ConversationError("template", f"it renders no message contents (only {text[:80]!r})")
        encoder.encode(_PROBE)
    except ConversationError as err:
        raise ChatTemplateError(f"{origin} cannot be used: on a plain user + assistant conversation {err}; every "
                                "record would be skipped: fix the template") from None
    finally:
        encoder.max_tokens = max_tokens


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads object hook: a key twice in one object is refused (plain json keeps the last)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ConversationError("bad_json", f"not valid JSON (key {key!r} appears twice in one object; a parser "
                                                "keeps only one of them): write each key once")
        out[key] = value
    return out


class ConversationError(ValueError):
    """One conversation that cannot be used; ``reason`` is the summary counter it lands in."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def validate_messages(record, roles: Iterable[str] = ROLES) -> list[dict]:
    """The ``messages`` of one JSONL record, checked: roles among ``roles`` (those the chat
    template renders, :func:`template_roles`), contents strings, at least one assistant turn.
    Raises ConversationError naming what is wrong."""
    roles = tuple(roles)
    if not isinstance(record, dict) or "messages" not in record:
        raise ConversationError("invalid", "record has no 'messages' list")
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise ConversationError("invalid", "'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ConversationError("invalid", f"message {i} must be an object with 'role' and 'content'")
        if m["role"] not in roles:
            raise ConversationError("unknown_role", f"message {i} has unknown role {m['role']!r} "
                                                    f"(the chat template renders {', '.join(roles)})")
        if not isinstance(m["content"], str):
            raise ConversationError("invalid", f"message {i} content must be a string, got "
                                               f"{type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ConversationError("no_assistant", "conversation has no assistant turn (nothing to train on)")
    return out


@dataclass
class Encoded:
    ids: np.ndarray  # int32 [L]
    mask: np.ndarray  # uint8 [L]; 1 = this token is a trained target
    truncated: bool = False
    cut_turn: bool = False  # truncation fell inside a trained assistant turn (it has no end-of-turn)
    empty_turns: int = 0  # empty or whitespace-only assistant turns, left out of the loss


class ChatEncoder:
    """Conversation -> (token ids, trained-target mask) with a tokenizer's chat template.

    ``train_on``: ``assistant`` (every assistant turn), ``last_assistant`` (only the final
    one) or ``all`` (every token). ``max_tokens``: longer conversations are truncated to it
    (``overlong=truncate``; ``truncate_mask_cut`` also takes the assistant turn the cut falls in
    out of the loss) or dropped (``drop``). Tokens after the last trained one are cut (they could
    teach nothing). Empty or whitespace-only assistant turns are not trained (a lone end-of-turn
    would teach the model to answer nothing).

    Message contents are text: a content that spells a control token (``<|eot_id|>``, a fake
    ``<|start_header_id|>assistant<|end_header_id|>``) is tokenized as those characters, never as
    the control token, unless ``allow_special_tokens``. Only the template's own text yields control
    tokens.
    """

    def __init__(self, tokenizer_path: str, train_on: str = "assistant", max_tokens: int | None = None,
                 overlong: str = "truncate", chat_template: str | None = None, allow_special_tokens: bool = False):
        from .tokenizer import load_tokenizer

        if train_on not in TRAIN_ON:
            raise ValueError(f"train_on={train_on!r}: use one of {', '.join(TRAIN_ON)}")
        if overlong not in OVERLONG:
            raise ValueError(f"overlong={overlong!r}: use one of {', '.join(OVERLONG)}")
        self.tokenizer = load_tokenizer(tokenizer_path)
        hf = self.tokenizer.hf
        if hf is None or not getattr(hf, "is_fast", False):
            raise ValueError(f"{tokenizer_path}: SFT needs a Hugging Face tokenizer directory (tokenizer.json): "
                             "chat templates and token offsets come from it")
        self.hf = hf
        self.template_source = "argument" if chat_template else ("tokenizer" if hf.chat_template else "default")
        self.chat_template = chat_template or hf.chat_template or DEFAULT_CHAT_TEMPLATE
        self.train_on, self.max_tokens, self.overlong = train_on, max_tokens, overlong
        self.allow_special_tokens = allow_special_tokens
        self.roles = template_roles(self)

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The template's text; a template that refuses the conversation (``raise_exception``, an
        empty prefix) raises ConversationError("template")."""
        from jinja2 import TemplateError

        try:
            return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                               chat_template=self.chat_template)
        except (TemplateError, ValueError, TypeError, KeyError, IndexError) as err:
            raise ConversationError("template", "the chat template refuses it: " + " ".join(str(err).split())) from None

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of ``messages`` followed by the generation prompt (for generating a reply)."""
        full = self.render(messages, add_generation_prompt=True)
        return self._tokenize(full, self._content_spans(messages, full, add_generation_prompt=True))[0]

    def _content_spans(self, messages: list[dict], full: str, add_generation_prompt: bool = False):
        """Character spans ``(start, end, message index)`` of the message contents in ``full``
        (the rendering of ``messages``).

        The template is rendered once more with each content replaced by a marker; the text
        between markers is the template's own, and each marker stands for the content as the
        template writes it (as is, trimmed, or JSON-escaped). Anything else is refused: a content
        we cannot locate cannot be kept from spelling control tokens."""
        skeleton = self.render([dict(m, content=_MARK.format(i)) for i, m in enumerate(messages)],
                               add_generation_prompt)
        parts = _MARK_RE.split(skeleton)  # template text, message index, template text, ...
        spans, at = [], 0
        for j in range(0, len(parts) - 1, 2):
            piece, content, after = parts[j], messages[int(parts[j + 1])]["content"], parts[j + 2]
            if not full.startswith(piece, at):
                spans = None
                break
            at += len(piece)
            last = j + 3 == len(parts)
            # the marker went through the same filters: its quotes (tojson) are in the template's text
            forms = (content, content.strip(), json.dumps(content, ensure_ascii=False)[1:-1], json.dumps(content)[1:-1])
            form = next((f for f in forms if full.startswith(f, at) and full.startswith(after, at + len(f))
                         and (not last or at + len(f) + len(after) == len(full))), None)
            if form is None:
                spans = None
                break
            spans.append((at, at + len(form), int(parts[j + 1])))
            at += len(form)
        if spans is None or (len(parts) == 1 and skeleton != full):
            if self.allow_special_tokens:
                return []
            raise ConversationError("template", "the chat template writes message contents in a way that cannot "
                                                "be located in its output, so they cannot be kept from spelling "
                                                "control tokens; pass a simpler --chat-template, or "
                                                "--allow-special-tokens")
        return spans

    def _tokenize(self, text: str, content_spans=()) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and character offsets of ``text``; inside ``content_spans`` special-token text is
        plain text (unless ``allow_special_tokens``)."""
        if self.allow_special_tokens or not content_spans:
            enc = self.hf(text, add_special_tokens=False, return_offsets_mapping=True)
            return enc["input_ids"], enc["offset_mapping"]
        ids, offsets, pieces, at = [], [], [], 0  # pieces: (start, end, is message content)
        for a, b, _ in content_spans:
            pieces += [(at, a, False), (a, b, True)]
            at = b
        pieces.append((at, len(text), False))
        for a, b, is_content in pieces:
            if a == b:
                continue
            enc = self.hf(text[a:b], add_special_tokens=False, return_offsets_mapping=True,
                          split_special_tokens=is_content)
            ids += enc["input_ids"]
            offsets += [(a + s, a + e) for s, e in enc["offset_mapping"]]
        return ids, offsets

    def trained_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]], list, int]:
        """The full rendering, the character spans of the assistant turns to train on, the spans
        of the message contents, and the number of empty assistant turns left out."""
        full = self.render(messages)
        contents = self._content_spans(messages, full)
        if self.train_on == "all":
            return full, [(0, len(full))], contents, 0
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.train_on == "last_assistant":
            turns = turns[-1:]
        empty = [i for i in turns if not messages[i]["content"].strip()]
        spans = []
        for i in turns:
            if i in empty:
                continue
            upto = self.render(messages[: i + 1])
            if i == 0:  # no earlier message to render with the generation prompt: start at the content
                if not contents:
                    raise ConversationError("template", "a conversation that starts with an assistant turn needs a "
                                                        "template whose message contents can be located")
                before = full[: min(a for a, _, k in contents if k == 0)]
            else:
                before = self.render(messages[:i], add_generation_prompt=True)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise ConversationError(
                    "template", "the chat template is not append-only (rendering a prefix of the conversation "
                                "is not a prefix of the full rendering), so assistant turns cannot be located; "
                                "pass a template that renders turns independently (--chat-template)")
            spans.append((len(before), len(upto)))
        return full, spans, contents, len(empty)

    def encode(self, messages: list[dict]) -> Encoded:
        full, spans, contents, empty = self.trained_spans(messages)
        ids, offsets = self._tokenize(full, contents)
        starts = np.array([o[0] for o in offsets], dtype=np.int64)
        turn = np.full(len(ids), -1, dtype=np.int64)  # which trained span each token starts in
        for k, (a, b) in enumerate(spans):
            turn[(starts >= a) & (starts < b)] = k
        mask = (turn >= 0).astype(np.uint8)
        ids = np.asarray(ids, dtype=np.int32)
        trained = np.flatnonzero(mask[1:])
        if trained.size == 0:
            why = "every assistant turn to train on is empty" if empty else "no token to train on after rendering"
            raise ConversationError("no_trained_tokens", why)
        end = int(trained[-1]) + 2  # keep up to the last trained target
        ids, mask, turn = ids[:end], mask[:end], turn[:end]
        truncated = cut = False
        if self.max_tokens is not None and len(ids) > self.max_tokens:
            if self.overlong == "drop":
                raise ConversationError("dropped_overlong", f"{len(ids)} tokens > {self.max_tokens} "
                                                            "(overlong=drop)")
            k = int(turn[self.max_tokens])  # the first token cut off: inside a trained turn?
            cut = k >= 0 and bool((turn[1: self.max_tokens] == k).any())
            ids, mask, turn = ids[: self.max_tokens], mask[: self.max_tokens], turn[: self.max_tokens]
            if cut and self.overlong == "truncate_mask_cut":
                mask[turn == k] = 0
            truncated = True
            if not mask[1:].any():
                raise ConversationError("dropped_overlong", f"no trained token within the first {self.max_tokens} "
                                                            f"tokens after truncation (overlong={self.overlong})")
        return Encoded(ids, mask, truncated, cut, empty)


def template_roles(encoder: ChatEncoder) -> tuple[str, ...]:
    """The roles a chat template renders: system, user, assistant, and any other role name the
    template compares ``role`` against (Llama-3.1: tool, ipython) whose message it writes out."""
    named = set(_ROLE_EQ.findall(encoder.chat_template))
    for group in _ROLE_IN.findall(encoder.chat_template):
        named.update(re.findall(r"""['"]([A-Za-z_][\w-]*)['"]""", group))
    roles = list(ROLES)
    for role in sorted(named - set(ROLES)):
        probe = [{"role": "user", "content": "q"}, {"role": role, "content": _MARK.format(0)},
                 {"role": "assistant", "content": "a"}]
        try:
            text = encoder.render(probe)
        except ConversationError:
            continue
        if _MARK.format(0) in text:
            roles.append(role)
    return tuple(roles)


# ---- preparing a directory -------------------------------------------------------------------
@dataclass
class Summary:
    records: int = 0
    conversations: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    cut_turns: int = 0  # truncated inside a trained assistant turn
    empty_turns: int = 0  # empty assistant turns, not trained
    max_tokens_seen: int = 0
    overlong: str = "truncate"
    seq_len: int = 0
    packed_rows: int = 0  # rows of seq_len the conversations pack into (packing.pack_rows)
    next_fit_rows: int = 0  # the same with next-fit in a shuffled order, for comparison
    skipped: dict = field(default_factory=dict)  # reason -> count
    examples: list = field(default_factory=list)  # first few "line N: message"

    def skip(self, reason: str, where: str, message: str, keep: int = 5) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if len(self.examples) < keep:
            self.examples.append(f"{where}: {reason}: {message}")

    def lines(self) -> list[str]:
        out = [f"records read:        {self.records}",
               f"conversations kept:  {self.conversations}",
               f"tokens:              {self.tokens}",
               f"trained tokens:      {self.trained_tokens} "
               f"({100.0 * self.trained_tokens / max(self.tokens, 1):.1f}%)",
               f"truncated:           {self.truncated}"]
        if self.cut_turns:
            fix = ("taken out of the loss (--overlong truncate_mask_cut)" if self.overlong == "truncate_mask_cut" else
                   "trained on a reply that stops mid-way with no end-of-turn; --overlong truncate_mask_cut takes "
                   "the cut turn out of the loss, --overlong drop skips the conversation")
            out.append(f"cut mid-answer:      {self.cut_turns} (the cut assistant turn is {fix})")
        if self.empty_turns:
            out.append(f"empty assistant turns: {self.empty_turns} (not trained: a lone end-of-turn would teach "
                       "the model to answer nothing)")
        if self.packed_rows:
            used = self.tokens - self.conversations  # a conversation of L tokens takes L - 1 positions
            out.append(f"packed at seq_len {self.seq_len}: {self.packed_rows} rows, "
                       f"{100.0 * used / (self.packed_rows * self.seq_len):.1f}% of positions filled (next-fit: "
                       f"{self.next_fit_rows} rows, {100.0 * used / (self.next_fit_rows * self.seq_len):.1f}%)")
        for reason in ("dropped_overlong", "no_assistant", "unknown_role", "invalid", "bad_json",
                       "no_trained_tokens", "template"):
            if self.skipped.get(reason):
                out.append(f"skipped ({reason}): {self.skipped[reason]}")
        out += [f"  e.g. {e}" for e in self.examples]
        return out


def iter_jsonl(paths: Iterable[str]) -> Iterator[tuple[str, str]]:
    """(``file:line``, line text) for every non-blank line."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    yield f"{path}:{n}", line


def _encode_line(encoder: ChatEncoder, item: tuple[str, str]):
    """(where, Encoded or None, (reason, message) or None) for one JSONL line."""
    where, line = item
    try:
        try:
            record = json.loads(line, object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as err:
            raise ConversationError("bad_json", f"not valid JSON ({err.msg})") from None
        return where, encoder.encode(validate_messages(record, encoder.roles)), None
    except ConversationError as err:
        return where, None, (err.reason, str(err))


_WORKER: ChatEncoder | None = None


def _worker_init(kwargs: dict) -> None:
    global _WORKER
    _WORKER = ChatEncoder(**kwargs)


def _worker_encode(item):
    return _encode_line(_WORKER, item)


def prepare(inputs: list[str], tokenizer: str, out_dir: str, seq_len: int, train_on: str = "assistant",
            overlong: str = "truncate", chat_template: str | None = None, strict: bool = False,
            workers: int = 1, allow_special_tokens: bool = False, chat_template_file: str | None = None) -> Summary:
    """Tokenize JSONL conversations into ``out_dir`` (format in the module docstring).

    Conversations are kept to ``seq_len + 1`` tokens (they then fill exactly ``seq_len`` input
    positions). Unusable records are skipped and counted by reason, or with ``strict`` the first
    one raises ConversationError naming its line. ``workers`` > 1 encodes in that many processes;
    the output is identical (records keep their input order). ``allow_special_tokens``: message
    contents that spell control tokens become those tokens (off: they stay text; see ChatEncoder).
    """
    from .preprocess import unwritable
    from .tokenizer import tokenizer_fingerprint

    for path in inputs:  # before any work: a bad path costs a second, and leaves nothing behind
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such input file")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"--seq-len {seq_len} must be >= 1: the recipe's train.seq_len (e.g. 4096)")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"--workers {workers} must be >= 1: the number of encoding processes")
    problem = unwritable(out_dir)
    if problem:
        raise ValueError(f"--out {out_dir}: {problem}; choose a writable directory")
    out = Path(out_dir)
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    foreign = [name for name in held if name not in PREPARED_FILES]
    if foreign:
        raise ValueError(f"--out {out_dir} is not empty and not an earlier prepare_sft output (it holds "
                         f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}): choose a new or empty "
                         "directory")
    kwargs = dict(tokenizer_path=str(tokenizer), train_on=train_on, max_tokens=seq_len + 1, overlong=overlong,
                  chat_template=chat_template, allow_special_tokens=allow_special_tokens)
    encoder = ChatEncoder(**kwargs)
    check_template(encoder, f"--chat-template {chat_template_file}" if chat_template_file else
                   "the chat template passed" if chat_template else
                   f"the chat template of {tokenizer}" if encoder.template_source == "tokenizer" else
                   "the default chat template")
    made = [out] + [d for d in out.parents if not d.exists()]  # removed again if this run fails
    made = [d for d in made if not d.exists()]
    out.mkdir(parents=True, exist_ok=True)
    summary = Summary(overlong=overlong, seq_len=seq_len)
    offsets = [0]
    tmp = [out / "tokens.bin.tmp", out / "loss_mask.bin.tmp"]
    pool = None
    try:
        if workers > 1:
            import multiprocessing as mp

            pool = mp.get_context("spawn").Pool(workers, initializer=_worker_init, initargs=(kwargs,))
            results = pool.imap(_worker_encode, iter_jsonl(inputs), chunksize=64)
        else:
            results = (_encode_line(encoder, item) for item in iter_jsonl(inputs))
        with open(tmp[0], "wb") as ft, open(tmp[1], "wb") as fm:
            for where, enc, problem in results:
                summary.records += 1
                if problem is not None:
                    if strict:
                        raise ConversationError(problem[0], f"{where}: {problem[1]}")
                    summary.skip(problem[0], where, problem[1])
                    continue
                ft.write(enc.ids.tobytes())
                fm.write(enc.mask.tobytes())
                offsets.append(offsets[-1] + len(enc.ids))
                summary.conversations += 1
                summary.tokens += len(enc.ids)
                summary.trained_tokens += int(enc.mask[1:].sum())
                summary.truncated += int(enc.truncated)
                summary.cut_turns += int(enc.cut_turn)
                summary.empty_turns += enc.empty_turns
                summary.max_tokens_seen = max(summary.max_tokens_seen, len(enc.ids))
        if summary.conversations == 0:
            raise ConversationError("empty", f"no usable conversation in {', '.join(map(str, inputs))}: "
                                             + "; ".join(summary.lines()))
    except BaseException:
        for t in tmp:
            t.unlink(missing_ok=True)
        for d in made:  # deepest first: a failed run leaves no directory it made
            try:
                d.rmdir()
            except OSError:
                break
        raise
    finally:
        if pool is not None:
            pool.terminate()
    tmp[0].replace(out / "tokens.bin")
    tmp[1].replace(out / "loss_mask.bin")
    offsets = np.asarray(offsets, dtype=np.int64)
    np.save(out / "offsets.npy", offsets)
    positions = np.diff(offsets) - 1
    summary.packed_rows = len(pack_rows(positions, seq_len, 0)[1]) - 1
    summary.next_fit_rows = len(pack_next_fit(positions[epoch_order(len(positions), 0, 0)], seq_len)) - 1
    tok = encoder.tokenizer
    meta = {
        "format": FORMAT_VERSION, "tokenizer": str(tokenizer), "vocab_size": tok.vocab_size,
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),  # which tokenizer made the ids (check_sft_data)
        "eos_id": tok.eos_id, "pad_id": tok.eos_id, "seq_len": seq_len, "train_on": train_on,
        "overlong": overlong, "allow_special_tokens": allow_special_tokens,
        "chat_template_source": encoder.template_source, "inputs": [str(p) for p in inputs],
        "summary": {k: v for k, v in summary.__dict__.items()},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    # The exact template the masks were computed with: copy it next to an HF export whose
    # tokenizer has none, so generation prompts match training.
    (out / "chat_template.jinja").write_text(encoder.chat_template)
    return summary


# ---- reading: samples, packing, epochs -------------------------------------------------------
class PreparedSFT:
    """A prepared directory, memory-mapped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.meta, offsets = check_prepared(self.path)
        self.offsets = np.asarray(offsets)
        self.tokens = np.memmap(self.path / "tokens.bin", dtype=np.int32, mode="r")
        self.mask = np.memmap(self.path / "loss_mask.bin", dtype=np.uint8, mode="r")
        self.lengths = np.diff(self.offsets)
        self.pad_id = int(self.meta["pad_id"])

    def __len__(self) -> int:
        return len(self.lengths)

    def conversation(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return np.asarray(self.tokens[a:b], dtype=np.int64), np.asarray(self.mask[a:b], dtype=np.float32)


class SFTDataset:
    """Samples of ``seq_len`` from a prepared directory; see the module docstring.

    ``epochs=None`` cycles forever (fixed ``train.steps``, or validation data); with a number,
    indices past the last real sample give all-padding rows (no loss).
    """

    def __init__(self, path: str | Path, seq_len: int, seed: int, packing: bool = True,
                 epochs: int | None = None, varlen: bool = True):
        self.data = PreparedSFT(path)
        self.varlen = varlen  # only for describe(): the engine decides (train.packed_attention)
        self.seq_len, self.seed, self.packing, self.epochs = seq_len, seed, packing, epochs
        longest = int(self.data.lengths.max())
        if longest > seq_len + 1:
            raise _too_long(path, longest, seq_len, self.data.meta.get("seq_len"))
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._rows: tuple[np.ndarray, np.ndarray] | None = None  # packed rows, before the epoch's shuffle
        self._starts = [0]  # first global sample index of each planned epoch

    # -- epoch plans
    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(conversation order, row boundaries into it) of one epoch: the packed rows (packed once)
        or one row per conversation, in an order drawn from (seed, epoch)."""
        if epoch not in self._plans:
            if self.packing:
                if self._rows is None:
                    self._rows = pack_rows(self.data.lengths - 1, self.seq_len, self.seed)
                order, bounds = epoch_plan(*self._rows, self.seed, epoch)
            else:
                order = epoch_order(len(self.data), self.seed, epoch)
                bounds = np.arange(len(order) + 1, dtype=np.int64)
            if len(self._plans) >= 4:  # keep a few epochs' plans (a plan is ~16 bytes per conversation)
                self._plans.pop(next(iter(self._plans)))
            self._plans[epoch] = (order, bounds)
        return self._plans[epoch]

    def samples_in_epoch(self, epoch: int) -> int:
        return len(self.plan(epoch)[1]) - 1

    def total_samples(self) -> int | None:
        if self.epochs is None:
            return None
        return sum(self.samples_in_epoch(e) for e in range(self.epochs))

    def fill_ratio(self, epoch: int = 0) -> float:
        """Fraction of input positions of an epoch's rows that hold conversation tokens."""
        return fill_ratio(self.data.lengths - 1, self.samples_in_epoch(epoch), self.seq_len)

    def locate(self, index: int) -> tuple[int, int] | None:
        """(epoch, row in epoch) of a global sample index; None past the last epoch."""
        while True:
            e = len(self._starts) - 1
            if index < self._starts[-1]:
                e = int(np.searchsorted(self._starts, index, side="right")) - 1
                return e, index - self._starts[e]
            if self.epochs is not None and e >= self.epochs:
                return None
            self._starts.append(self._starts[-1] + self.samples_in_epoch(e))

    def __len__(self) -> int:
        total = self.total_samples()
        return total if total is not None else 2**31 - 1

    def conversations_of(self, index: int) -> list[int]:
        where = self.locate(index)
        if where is None:
            return []
        order, bounds = self.plan(where[0])
        return [int(c) for c in order[bounds[where[1]]: bounds[where[1] + 1]]]

    # -- samples
    def row(self, conversations: list[int]) -> dict[str, torch.Tensor]:
        """One sample holding ``conversations`` back to back, then padding."""
        s, pad = self.seq_len, self.data.pad_id
        tokens = np.full(s, pad, dtype=np.int64)
        labels = np.full(s, pad, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        segment = np.full(s, len(conversations), dtype=np.int64)  # padding: a segment of its own
        at = 0
        for k, c in enumerate(conversations):
            ids, mask = self.data.conversation(c)
            n = len(ids) - 1
            tokens[at: at + n], labels[at: at + n] = ids[:-1], ids[1:]
            loss_mask[at: at + n], segment[at: at + n] = mask[1:], k
            at += n
        out = {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
               "loss_mask": torch.from_numpy(loss_mask)}
        if self.packing:
            out["segment_ids"] = torch.from_numpy(segment)
        return out

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.row(self.conversations_of(index))

    def describe(self) -> str:
        d, n = self.data, len(self.data)
        how = "varlen attention, cu_seqlens" if self.varlen else "dense block-diagonal mask"
        mode = (f"packing ON (several conversations per row, {how}): "
                f"{self.samples_in_epoch(0)} rows per epoch, {100 * self.fill_ratio():.1f}% of positions filled"
                if self.packing else
                f"packing OFF (one conversation per row, padded): {n} rows per epoch, "
                f"{100 * self.fill_ratio():.1f}% of positions filled")
        epochs = f"{self.epochs} epochs" if self.epochs is not None else "cycling epochs"
        return f"SFT data {d.path}: {n} conversations, seq_len {self.seq_len}; {mode}; {epochs}"


# ---- recipe glue -----------------------------------------------------------------------------
def build_sft_datasets(recipe) -> tuple[SFTDataset, SFTDataset | None]:
    """Train (and optional validation) datasets for ``data.kind: sft``."""
    from .model import attention_backend

    d, t = recipe.data, recipe.train
    check_sft_data(recipe)
    kind, how = attention_backend(recipe), recipe.train.packed_attention
    if d.packing and how == "dense" and kind in ("te", "flash-attn"):
        raise SFTDataError(f"train.packed_attention=dense needs train.attention=sdpa: the {kind} path runs a plain "
                           "causal kernel and would ignore the block-diagonal mask (packed conversations would "
                           "attend to each other). Set train.packed_attention=varlen, or train.attention=sdpa")
    if d.packing and how == "varlen" and kind == "unfused":
        raise SFTDataError("data.packing=true with train.attention=unfused: Megatron's unfused attention has no "
                           "varlen (cu_seqlens) path. Set train.attention=sdpa, or train.packed_attention=dense")
    train = SFTDataset(d.sft_path, t.seq_len, t.seed, d.packing, d.epochs, how == "varlen")
    valid = None
    if d.sft_valid_path:
        # one pass: rows past its end are loss-free padding (train.evaluate reads it whole when small)
        valid = SFTDataset(d.sft_valid_path, t.seq_len, t.seed + 1, d.packing, 1)
    if _is_main():
        print(train.describe(), flush=True)
        if d.epochs is not None:
            print(f"SFT: {train.total_samples()} rows over {d.epochs} epochs / global batch "
                  f"{recipe.layout.global_batch} = {t.steps} steps", flush=True)
    return train, valid


def check_sft_data(recipe) -> None:
    """What ``data.check_data`` checks for ``data.kind: sft``, before anything is built: for
    data.sft_path and data.sft_valid_path, the files of :func:`check_prepared`; conversations that
    fit train.seq_len + 1; the tokenizer the data was prepared with fits model.vocab_size (its
    pad/EOS id too) and, when the recipe names data.tokenizer, is that one (vocab size, EOS id and
    the sha256 of its tokenizer.json, recorded by :func:`prepare`); the first conversation's ids lie
    inside the vocabulary. Raises SFTDataError (a DataError)."""
    from .tokenizer import check_vocab_fits, load_tokenizer, tokenizer_fingerprint

    d, vocab, seq_len = recipe.data, recipe.model.vocab_size, recipe.train.seq_len
    tok = fingerprint = None
    if d.tokenizer is not None:
        try:
            tok = load_tokenizer(d.tokenizer)
        except (OSError, ValueError) as err:
            raise SFTDataError("data.tokenizer: " + " ".join(str(err).split()) +
                               " Set data.tokenizer to the tokenizer the SFT data was prepared with.") from None
        fingerprint = tokenizer_fingerprint(d.tokenizer)
    for key, path in (("data.sft_path", d.sft_path), ("data.sft_valid_path", d.sft_valid_path)):
        if not path:
            continue
        meta, offsets = check_prepared(path, key)
        lengths = np.diff(offsets)
        if int(lengths.min()) < 2:
            raise SFTDataError(f"{Path(path) / 'offsets.npy'}: a conversation of {int(lengths.min())} tokens (offsets "
                               f"must grow by at least 2): the file is damaged; re-run {_prepare_hint(path, meta)}")
        longest = int(lengths.max())
        if longest > seq_len + 1:
            raise _too_long(path, longest, seq_len, meta.get("seq_len"))
        made_with = f"{path} was prepared with tokenizer {meta.get('tokenizer')} ({meta['vocab_size']:,} tokens)"
        try:
            check_vocab_fits(int(meta["vocab_size"]), vocab)
        except ValueError as err:
            raise SFTDataError(f"{made_with}: {err}") from None
        for what in ("pad_id", "eos_id"):
            if meta.get(what) is not None and not 0 <= int(meta[what]) < vocab:
                raise SFTDataError(f"{Path(path) / 'meta.json'}: {what} {meta[what]} is outside model.vocab_size="
                                   f"{vocab}: set model.vocab_size to at least {int(meta[what]) + 1}")
        if tok is not None:
            recorded = meta.get("tokenizer_sha256")  # absent in directories prepared before it was recorded
            differs = [f"it has {tok.vocab_size:,} tokens"] if meta["vocab_size"] != tok.vocab_size else []
            if meta.get("eos_id") is not None and meta["eos_id"] != tok.eos_id:
                differs.append(f"its EOS id is {tok.eos_id}, not {meta['eos_id']}")
            if recorded and fingerprint and recorded != fingerprint:
                differs.append("its tokenizer.json differs (sha256)")
            if differs:
                raise SFTDataError(f"{made_with}, not with data.tokenizer={d.tokenizer} ({'; '.join(differs)}): re-run "
                                   f"tools/prepare_sft.py with --tokenizer {d.tokenizer}, or set data.tokenizer to "
                                   "the tokenizer the data was prepared with")
        first = np.fromfile(Path(path) / "tokens.bin", dtype=np.int32, count=min(int(offsets[1]), 1 << 20))
        if first.size and (int(first.max()) >= int(meta["vocab_size"]) or int(first.min()) < 0):
            bad = int(first.max()) if int(first.max()) >= int(meta["vocab_size"]) else int(first.min())
            raise SFTDataError(f"{Path(path) / 'tokens.bin'}: its first conversation holds token id {bad}, outside the "
                               f"{meta['vocab_size']:,} tokens meta.json records: the files are damaged or from "
                               f"different runs; re-run {_prepare_hint(path, meta)}")


def _is_main() -> bool:
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0
