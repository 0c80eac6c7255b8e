#!/usr/bin/env python
"""Write gaperon_demo_cloze.jsonl: the French/English cloze items of the shipped local task.

How the items are chosen (rerun this to regenerate them; the committed file is what tests read):
the first 60 kB of the demo corpus's English and French text (megatron_ext/corpus.py: the Python
language reference, French man pages; the same prefix that the demo and the tests train on),
split into sentences of 12-40 plain words. Each item's context is a sentence's first 6-10 words
and its answer the next 3 words. The three distractors are 3-word spans from (1) another sentence
of the same language, (2) a sentence of the other language, (3) a line of the corpus's Python
code. A model that learnt the corpus prefers the true continuation (or at least the right
language); a random initialisation is at chance (25%). Items are deduplicated; answers are
shuffled with a fixed seed.
"""
from __future__ import annotations

import json
import random
import re
import tempfile
from pathlib import Path


from megatron_ext.corpus import build_demo_corpus  # noqa: E402

PER_LANG = 100  # English has fewer plain sentences in its 60 kB: 85
WORD = re.compile(r"^[A-Za-zÀ-ÿœŒ'’,-]+$")


def sentences(texts: list[str]) -> list[list[str]]:
    out = []
    for text in texts:
        for para in re.split(r"\n\s*\n", text):
            if para.startswith((" ", "\t")):  # indented: grammar rules and examples
                continue
            for sent in re.split(r"(?<=[.;:!?])\s+", " ".join(para.split())):
                words = sent.rstrip(".;:!?").split()
                if 12 <= len(words) <= 40 and all(WORD.match(w) for w in words):
                    out.append(words)
    return out


def code_spans(texts: list[str]) -> list[list[str]]:
    lines = [line.split() for text in texts for line in text.splitlines()]
    return [w for w in lines if len(w) >= 3 and not w[0].startswith(("#", '"'))]


def main(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = build_demo_corpus(tmp, max_bytes_per_lang=60_000)
        texts = {k: [json.loads(line)["text"] for line in open(p, encoding="utf-8")] for k, p in corpus.items()}
    rng = random.Random(0)
    sents = {lang: sentences(texts[lang]) for lang in ("en", "fr")}
    code = code_spans(texts["code"])
    items, seen = [], set()
    for lang, other in (("en", "fr"), ("fr", "en")):
        pool = sents[lang][:]
        rng.shuffle(pool)
        for words in pool:
            k = rng.randint(6, 10)
            context, answer = " ".join(words[:k]), " ".join(words[k:k + 3])
            if context in seen or len(words) < k + 3:
                continue
            same = rng.choice([s for s in sents[lang] if s is not words])
            foreign = rng.choice(sents[other])
            line = rng.choice(code)
            j, f = rng.randint(0, len(same) - 3), rng.randint(0, len(foreign) - 3)
            choices = [answer, " ".join(same[j:j + 3]), " ".join(foreign[f:f + 3]), " ".join(line[:3])]
            if len(set(choices)) < 4:
                continue
            order = list(range(4))
            rng.shuffle(order)
            seen.add(context)
            items.append({"id": f"{lang}-{len([i for i in items if i['lang'] == lang]):03d}", "lang": lang,
                          "context": context, "choices": [choices[i] for i in order], "label": order.index(0)})
            if sum(i["lang"] == lang for i in items) == PER_LANG:
                break
    out.write_text("".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items), encoding="utf-8")
    print(f"wrote {out}: {len(items)} items")


if __name__ == "__main__":
    main(Path(__file__).with_name("gaperon_demo_cloze.jsonl"))
