"""Chat conversations -> token ids + trained-target masks, with a tokenizer's chat template.

:class:`ChatEncoder` renders a conversation with the tokenizer's chat template (Hugging Face
``apply_chat_template``; :data:`DEFAULT_CHAT_TEMPLATE`, Llama-3 style, when the tokenizer has
none) and marks the tokens to train on, on the rendered text (see megatron_ext/sft.py's
docstring for the rule). Templates are checked once (:func:`check_template`), records one by one
(:func:`validate_messages`). Used by SFT preparation (sft.py) and the export (the template goes
with the tokenizer).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
from typing import Iterable

from .errors import GaperonError

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
