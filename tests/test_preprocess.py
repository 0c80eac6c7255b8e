"""Preprocessing: documents -> .bin/.idx read back token for token, bad input reported by file:line,
no half-written dataset, tokenizer checks, offline tokenizer training, the demo corpus."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

from megatron_ext import preprocess as pp  # noqa: E402
from megatron_ext.corpus import build_demo_corpus  # noqa: E402
from megatron_ext.tokenizer import check_vocab_fits, load_tokenizer, train_tokenizer  # noqa: E402
TOOL = str(ROOT / "tools" / "preprocess_data.py")


def run_tool(*args) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=120)


def read_dataset(prefix) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    # one sequence per document, each written once: the index and the .bin agree exactly
    assert list(ds.document_indices) == list(range(len(ds) + 1))
    assert int(ds.sequence_lengths.sum()) * ds.index.dtype_size == Path(f"{prefix}.bin").stat().st_size
    return [np.array(ds[i]) for i in range(len(ds))]  # copies: the mmap closes with ds


def expected(tok, texts) -> list[list[int]]:
    return [tok.encode(t) + [tok.eos_id] for t in texts]


def write_jsonl(path: Path, lines: list) -> Path:
    """``lines``: dicts (dumped as JSON) or raw bytes (written as is)."""
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else json.dumps(line, ensure_ascii=False).encode() + b"\n")
    return path


def no_outputs(prefix: Path) -> bool:
    return not list(prefix.parent.glob(prefix.name + "*"))



@pytest.fixture(scope="module")
def docs(corpus) -> list[str]:
    """Real fr/en/code documents, interleaved, plus awkward ones."""
    by_lang = [[json.loads(line)["text"] for line in open(corpus[k], encoding="utf-8")][:8] for k in corpus]
    mixed = [d for group in zip(*by_lang, strict=False) for d in group]
    return mixed + ["x", "crème brûlée 🍮\r\nligne 2", "  leading spaces\n\n\n", "not an <|end_of_text|> marker"]


# ------------------------------------------------------------------------------------ round trip

def test_round_trip_two_workers_cli(tmp_path, bpe, docs, capsys):
    """jsonl + txt + parquet through the CLI's main() with 2 worker processes and tiny chunks: every
    document once, in order, equal to encode(doc) + [eos]. (In-process: a subprocess would pay
    megatron.core's ~10 s import again; the subprocess tests below check exit codes.)"""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megatron_ext.cli.preprocess import main

    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"text": d, "id": i} for i, d in enumerate(docs[:20])])
    txts = []
    for i, d in enumerate(docs[20:24]):
        txts.append(tmp_path / f"t{i}.txt")
        txts[-1].write_text(d, encoding="utf-8")
    parquet = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": docs[24:]}), parquet)
    prefix = tmp_path / "out" / "mix"
    assert main(["--input", str(jsonl), *map(str, txts), str(parquet), "--output-prefix", str(prefix),
                 "--tokenizer", str(bpe), "--workers", "2", "--chunk-docs", "3"]) == 0
    out = capsys.readouterr().out
    assert f"documents: {len(docs)} " in out and "skipped: 0" in out

    tok = load_tokenizer(bpe)
    got = read_dataset(prefix)
    assert len(got) == len(docs)
    for i, (a, b) in enumerate(zip(got, expected(tok, docs), strict=True)):
        assert a.tolist() == b, f"document {i} differs"
    # special-token text inside a document stays text: EOS only at the end of each document
    assert all((a[:-1] != tok.eos_id).all() and a[-1] == tok.eos_id for a in got)
    assert no_outputs(prefix.parent / "mix.tmp")


def test_txt_lines_mode_and_worker_count_invariance(tmp_path, bpe, docs):
    lines = [d.replace("\n", " ").replace("\r", " ") for d in docs[:10]]
    src = tmp_path / "lines.txt"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    pp.preprocess([src], str(tmp_path / "one"), str(bpe), workers=1, txt_mode="lines", progress=False)
    pp.preprocess([src], str(tmp_path / "two"), str(bpe), workers=2, txt_mode="lines", chunk_docs=2, progress=False)
    assert (tmp_path / "one.bin").read_bytes() == (tmp_path / "two.bin").read_bytes()
    assert (tmp_path / "one.idx").read_bytes() == (tmp_path / "two.idx").read_bytes()
    assert [a.tolist() for a in read_dataset(tmp_path / "one")] == expected(load_tokenizer(bpe), lines)


# ------------------------------------------------------------------------------------- bad input

BAD_CASES = {  # name: (line written at line 3 of a 5-line file, reason fragment)
    "malformed_json": (b'{"text": "unterminated\n', "malformed JSON"),
    "missing_key": (b'{"body": "no text here"}\n', "missing key 'text'"),
    "non_utf8": (b'{"text": "caf\xe9 cr\xe8me"}\n', "not valid UTF-8 (byte 0xe9"),
    "bad_surrogate": (b'{"text": "half an emoji \\ud83d here"}\n', "not valid Unicode (lone surrogate \\ud83d"),
}
GOOD = ["premier document, avec des mots", "second document with words", "def third(): return 3",
        "quatri\u00e8me et dernier"]


def bad_file(tmp_path: Path, bad_line: bytes) -> Path:
    return write_jsonl(tmp_path / "bad.jsonl", [{"text": GOOD[0]}, {"text": GOOD[1]}, bad_line,
                                                  {"text": GOOD[2]}, {"text": GOOD[3]}])


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_fail_names_file_and_line(tmp_path, bpe, case):
    bad_line, reason = BAD_CASES[case]
    src = bad_file(tmp_path, bad_line)
    prefix = tmp_path / "out" / "ds"
    with pytest.raises(pp.PreprocessError) as err:
        pp.preprocess([src], str(prefix), str(bpe), workers=1, progress=False)
    assert f"{src}:3: " in str(err.value) and reason in str(err.value)
    assert no_outputs(prefix)


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_skip_counts_and_reports(tmp_path, bpe, case, capsys):
    from megatron_ext.cli.preprocess import main

    bad_line, reason = BAD_CASES[case]
    src = bad_file(tmp_path, bad_line)
    prefix = tmp_path / "ds"
    assert main(["--input", str(src), "--output-prefix", str(prefix), "--tokenizer", str(bpe), "--workers", "1",
                 "--on-error", "skip", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "documents: 4 " in out and "skipped: 1" in out
    assert f"skipped {src}:3: {reason}" in out
    assert [a.tolist() for a in read_dataset(prefix)] == expected(load_tokenizer(bpe), GOOD)


def test_bad_utf8_in_text_file_names_its_line(tmp_path, bpe):
    src = tmp_path / "doc.txt"
    src.write_bytes("ligne un\nligne deux\n".encode() + b"ligne \xff trois\n")
    summary = pp.preprocess([src, bad_file(tmp_path, BAD_CASES["missing_key"][0])], str(tmp_path / "ds"),
                            str(bpe), on_error="skip", progress=False)
    assert [(Path(f).name, line) for f, line, _ in summary.skipped] == [("doc.txt", 3), ("bad.jsonl", 3)]
    assert summary.documents == 4


def test_fail_mode_cli_exit_code_and_message(tmp_path, bpe):
    src = bad_file(tmp_path, BAD_CASES["malformed_json"][0])
    prefix = tmp_path / "ds"
    proc = run_tool("--input", src, "--output-prefix", prefix, "--tokenizer", bpe, "--workers", 2, "--no-progress")
    assert proc.returncode == 2
    assert f"error: {src}:3: malformed JSON" in proc.stderr and "--on-error skip" in proc.stderr
    assert no_outputs(prefix)


def test_all_documents_bad_is_an_error(tmp_path, bpe):
    src = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": ""}])
    with pytest.raises(pp.PreprocessError, match="no valid document"):
        pp.preprocess([src], str(tmp_path / "ds"), str(bpe), on_error="skip", progress=False)
    assert no_outputs(tmp_path / "ds")


def test_whitespace_documents_are_kept_and_empty_ones_skipped_even_in_fail_mode(tmp_path, bpe):
    """As Megatron-LM: whitespace is text (tokens + EOS). An empty document has no tokens and the
    one-sequence-per-document format cannot hold it: skipped and counted, never a failure."""
    src = write_jsonl(tmp_path / "ws.jsonl", [{"text": "a"}, {"text": "  \n "}, {"text": ""}, {"text": "\t"}])
    summary = pp.preprocess([src], str(tmp_path / "ds"), str(bpe), progress=False)
    assert summary.documents == 3 and summary.skipped == [(str(src), 3, "empty document")]
    assert [a.tolist() for a in read_dataset(tmp_path / "ds")] == expected(load_tokenizer(bpe), ["a", "  \n ", "\t"])


# ---------------------------------------------------------------------------- interrupted runs

def test_interrupted_run_leaves_nothing_under_the_final_name(tmp_path, bpe, docs, monkeypatch):
    src = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    prefix = tmp_path / "out" / "ds"
    real = load_tokenizer(bpe)
    calls = {"n": 0}

    def flaky_encode(text):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("tokenizer crashed midway")
        return real.encode(text)

    monkeypatch.setattr(real, "encode", flaky_encode)
    monkeypatch.setattr(pp, "load_tokenizer", lambda *a, **k: real)
    with pytest.raises(RuntimeError, match="midway"):
        pp.preprocess([src], str(prefix), str(bpe), workers=1, chunk_docs=2, encoder="hf", progress=False)
    assert calls["n"] == 7 and no_outputs(prefix)

    # a run that fails over an existing dataset leaves the old one whole
    monkeypatch.undo()
    pp.preprocess([src], str(prefix), str(bpe), progress=False)
    before = {p.name: p.read_bytes() for p in prefix.parent.iterdir()}
    bad = bad_file(tmp_path, BAD_CASES["non_utf8"][0])
    with pytest.raises(pp.PreprocessError):
        pp.preprocess([bad], str(prefix), str(bpe), progress=False)
    assert {p.name: p.read_bytes() for p in prefix.parent.iterdir()} == before


# ------------------------------------------------------------------------------------ tokenizers

def test_tokenizer_too_big_for_model(tmp_path, bpe):
    with pytest.raises(ValueError) as err:
        check_vocab_fits(128_256, 32_000)
    assert "128,256" in str(err.value) and "32,000" in str(err.value) and "model.vocab_size" in str(err.value)
    check_vocab_fits(128_256, 128_256)

    src = write_jsonl(tmp_path / "a.jsonl", [{"text": "bonjour"}])
    proc = run_tool("--input", src, "--output-prefix", tmp_path / "ds", "--tokenizer", bpe,
                    "--model-vocab-size", 300, "--workers", 1)
    assert proc.returncode == 2 and "512 tokens" in proc.stderr and "300" in proc.stderr
    assert no_outputs(tmp_path / "ds")


def test_train_tokenizer_cli_loads_offline_in_transformers(tmp_path, corpus, monkeypatch):
    from megatron_ext.cli.preprocess import main

    out = tmp_path / "tok"
    assert main(["train-tokenizer", "--input", *map(str, corpus.values()), "--vocab-size", "600",
                 "--out", str(out)]) == 0
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert len(hf) == 600
    assert hf.eos_token == "<|end_of_text|>" and hf.bos_token == "<|begin_of_text|>"
    specials = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    ids = hf.convert_tokens_to_ids(specials)
    assert len(set(ids)) == 3 and all(0 <= i < 600 for i in ids)
    chat = hf.apply_chat_template([{"role": "user", "content": "Bonjour"}], tokenize=False,
                                  add_generation_prompt=True)
    assert chat.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nBonjour<|eot_id|>")

    tok = load_tokenizer(out)
    text = "Les paquets sont récupérés et mis à jour.\n    return x  # 123456"
    assert tok.vocab_size == 600 and tok.bos_id == hf.bos_token_id and tok.eos_id == hf.eos_token_id
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text)) == text
    assert tok.hf.eos_token_id == tok.eos_id


def test_sentencepiece_tokenizer(tmp_path, corpus):
    model = train_tokenizer([corpus["fr"], corpus["en"]], tmp_path / "sp", vocab_size=512, kind="sentencepiece")
    for path in (model, model.parent):
        tok = load_tokenizer(path)
        assert tok.vocab_size <= 512 and tok.eos_id is not None and tok.bos_id is not None
        text = "Chaque mot-clé est comparé exactement."
        assert tok.decode(tok.encode(text)) == text
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        load_tokenizer(tmp_path / "missing")


# ------------------------------------------------------------------------------------ demo corpus

def test_demo_corpus_has_real_french_english_and_code(corpus, tmp_path):
    texts = {k: [json.loads(line)["text"] for line in open(p, encoding="utf-8")] for k, p in corpus.items()}
    assert all(texts[k] for k in ("fr", "en", "code"))
    fr, en, code = (" ".join(texts[k]) for k in ("fr", "en", "code"))
    assert all(fr.count(w) >= 5 for w in (" le ", " les ", " des ", " est "))
    assert "é" in fr and "\\(" not in fr  # roff escapes decoded
    assert all(en.count(w) >= 5 for w in (" the ", " of ", " is "))
    assert "def " in code and "import " in code
    again = build_demo_corpus(tmp_path, max_bytes_per_lang=60_000)
    assert all(again[k].read_bytes() == corpus[k].read_bytes() for k in corpus)
