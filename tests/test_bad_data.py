"""Bad data is refused before anything is built: ``data.check_data(recipe)`` raises DataError (one
line naming the file and the fix) for missing, truncated or corrupt indexed datasets and SFT
directories, empty datasets and splits, tokenizers that cannot load or do not fit the model; and
it only reads (every file on disk is byte-identical afterwards). Through the real command lines:
tools/train.py exits 2 with that line before a model, an engine or a process group exists, and
tools/preprocess_data.py / tools/prepare_sft.py refuse an unwritable output before tokenizing."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import BAD_SEQ as SEQ, BAD_VOCAB as VOCAB, ROOT, TINY, cpu_env

from megatron_ext import preprocess as pp
from megatron_ext import sft
from megatron_ext.config import load_recipe
from megatron_ext.data import DataError, check_data
from megatron_ext.tokenizer import load_tokenizer



# ---- fixtures: built once per session (conftest.bad_data_fixture), damaged as copies ---------------
@pytest.fixture(scope="module")
def fx(bad_data_fixture) -> SimpleNamespace:
    return bad_data_fixture


def snapshot(*dirs: Path) -> dict[str, str]:
    """Every path under ``dirs`` -> sha256 of its bytes ('dir' for directories)."""
    out = {}
    for d in dirs:
        for p in sorted(Path(d).rglob("*")):
            out[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def copy_dataset(src: Path, dst_dir: Path, name: str = "ds") -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    for ext in (".bin", ".idx"):
        shutil.copyfile(f"{src}{ext}", dst_dir / f"{name}{ext}")
    return dst_dir / name


def truncate(path: Path, size: int) -> None:
    os.truncate(path, size)


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def indexed(fx, blend, *extra) -> list[str]:
    blend = [[1.0, str(blend)]] if isinstance(blend, (str, Path)) else [[w, str(p)] for w, p in blend]
    return ["data.kind=indexed", f"data.blend={json.dumps(blend)}", f"data.tokenizer={fx.tok}",
            f"model.vocab_size={VOCAB}", *extra]


def sft_data(path, *extra) -> list[str]:
    return ["data.kind=sft", f"data.sft_path={path}", f"model.vocab_size={VOCAB}", "train.attention=sdpa", *extra]


# ---- the cases: (fx, tmp) -> (overrides, fragments the message must hold) ---------------------------
def _missing_both(fx, tmp):
    return indexed(fx, tmp / "nowhere" / "ds"), ["nowhere/ds.bin", "nowhere/ds.idx", "do not exist",
                                                 "tools/preprocess_data.py", f"--output-prefix {tmp}/nowhere/ds"]


def _missing_idx(fx, tmp):
    prefix = copy_dataset(fx.ds, tmp)
    os.remove(f"{prefix}.idx")
    return indexed(fx, prefix), [f"{prefix}.idx is missing", f"{prefix}.bin is there", "copy", "--output-prefix"]


def _missing_bin(fx, tmp):
    prefix = copy_dataset(fx.ds, tmp)
    os.remove(f"{prefix}.bin")
    return indexed(fx, prefix), [f"{prefix}.bin is missing", f"{prefix}.idx is there", "--output-prefix"]


def _prefix_with_extension(fx, tmp):
    prefix = copy_dataset(fx.ds, tmp)
    return indexed(fx, f"{prefix}.bin"), [f"{prefix}.bin", "dataset prefixes", f"write {prefix} (without .bin/.idx)"]


def _idx_shorter_than_header(fx, tmp):
    prefix = copy_dataset(fx.ds, tmp)
    truncate(Path(f"{prefix}.idx"), 20)
    return indexed(fx, prefix), [f"{prefix}.idx", "truncated (20 bytes", "header", "--output-prefix"]


def _idx_bad_magic(fx, tmp):
    prefix = copy_dataset(fx.ds, tmp)
    patch(Path(f"{prefix}.idx"), 0, b"NOTANIDX")
    return indexed(fx, prefix), [f"{prefix}.idx", "bad magic", "re-create it"]


def _idx_bad_version(fx, tmp):
    prefix = copy_dataset(fx.ds, tmp)
    patch(Path(f"{prefix}.idx"), 9, struct.pack("<Q", 7))
    return indexed(fx, prefix), [f"{prefix}.idx", "corrupt header (version 7", "re-create it"]


def _idx_truncated(fx, tmp):
    prefix = copy_dataset(fx.ds, tmp)
    size = os.path.getsize(f"{prefix}.idx")
    truncate(Path(f"{prefix}.idx"), size - 100)
    return indexed(fx, prefix), [f"{prefix}.idx", "truncated", "its header says 300 sequences",
                                 f"take {size:,} bytes", f"has {size - 100:,}", "--output-prefix"]


def _bin_truncated(fx, tmp):
    prefix = copy_dataset(fx.ds, tmp)
    size = os.path.getsize(f"{prefix}.bin")
    truncate(Path(f"{prefix}.bin"), size - 10)
    return indexed(fx, prefix), [f"{prefix}.bin: {size - 10:,} bytes", f"says {size:,}", "truncated",
                                 "copy both files again", "--output-prefix"]


def _bin_longer(fx, tmp):
    prefix = copy_dataset(fx.ds, tmp)
    size = os.path.getsize(f"{prefix}.bin")
    with open(f"{prefix}.bin", "ab") as f:
        f.write(b"\0" * 64)
    return indexed(fx, prefix), [f"{prefix}.bin: {size + 64:,} bytes", f"says {size:,}", "longer than its index"]


def _empty_dataset(fx, tmp):
    return indexed(fx, fx.empty), [f"{fx.empty}: empty dataset (0 documents", "remove it from data.blend"]


def _empty_valid_split(fx, tmp):
    # eval_interval=0 still builds the valid split (megatron-core loops forever on it): refused too
    return (indexed(fx, [(0.9, fx.ds), (0.1, fx.few)], 'data.split="90,10,0"', "train.eval_interval=0"),
            ["data.split=90,10,0", "valid split", f"{fx.few} without a document (it has 3)", "change data.split",
             "data.valid_blend"])


def _empty_valid_blend_entry(fx, tmp):
    return (indexed(fx, fx.ds, f"data.valid_blend={json.dumps([[1.0, str(fx.empty)]])}"),
            [f"{fx.empty}: empty dataset", "data.valid_blend"])


def _no_tokenizer(fx, tmp):
    return indexed(fx, fx.ds, "data.tokenizer=null"), ["data.kind=indexed needs data.tokenizer", "set it to"]


def _tokenizer_missing(fx, tmp):
    return indexed(fx, fx.ds, f"data.tokenizer={tmp / 'no_tok'}"), [f"{tmp / 'no_tok'}", "does not exist",
                                                                    "copy the tokenizer here"]


def _not_a_tokenizer(fx, tmp):
    (tmp / "some_dir").mkdir()
    return indexed(fx, fx.ds, f"data.tokenizer={tmp / 'some_dir'}"), [f"{tmp / 'some_dir'}: not a tokenizer",
                                                                      "tokenizer.json", "Set data.tokenizer"]


def _tokenizer_corrupt(fx, tmp):
    shutil.copytree(fx.tok, tmp / "tok")
    truncate(tmp / "tok" / "tokenizer.json", 1000)
    return indexed(fx, fx.ds, f"data.tokenizer={tmp / 'tok'}"), [f"{tmp / 'tok' / 'tokenizer.json'}",
                                                                 "cannot be read", "copy the tokenizer again"]


def _vocab_smaller_padding_covers(fx, tmp):
    # 300 pads to 384: every id fits the embedding, so this used to train silently on padding rows
    return (indexed(fx, fx.ds, "model.vocab_size=300"),
            [f"data.tokenizer={fx.tok}", "384 tokens", "set model.vocab_size to at least 384 (the tokenizer's size)"])


def _vocab_much_smaller(fx, tmp):
    return indexed(fx, fx.ds, "model.vocab_size=256"), ["set model.vocab_size to at least 384 (the tokenizer's size)"]


def _ids_outside_tokenizer(fx, tmp):
    return (indexed(fx, fx.high_ids, "model.vocab_size=512"),
            [f"{fx.high_ids}.bin", "token id 450", "another tokenizer", "data.tokenizer"])


def _cache_dir_under_file(fx, tmp):
    return (indexed(fx, fx.ds, f"data.cache_dir={fx.afile / 'cache'}"),
            ["data.cache_dir", f"{fx.afile} is a file", "set data.cache_dir to a writable directory"])


def _sft_copy(fx, tmp) -> Path:
    shutil.copytree(fx.sft, tmp / "sft")
    return tmp / "sft"


def _sft_missing_dir(fx, tmp):
    return sft_data(tmp / "no_sft"), [f"{tmp / 'no_sft'}: no such directory", "data.sft_path names it",
                                      "tools/prepare_sft.py", f"--out {tmp / 'no_sft'}"]


def _sft_missing_meta(fx, tmp):
    d = _sft_copy(fx, tmp)
    os.remove(d / "meta.json")
    return sft_data(d), [f"{d}: no prepared SFT data (meta.json missing", "tools/prepare_sft.py"]


def _sft_missing_file(name):
    def case(fx, tmp):
        d = _sft_copy(fx, tmp)
        os.remove(d / name)
        command = f"`python tools/prepare_sft.py {fx.chats} --tokenizer {fx.tok} --out {d} --seq-len {SEQ}`"
        return sft_data(d), [f"{d / name} is missing", f"re-run {command}"]  # the command meta.json recorded
    return case


def _sft_truncated(name, cut):
    def case(fx, tmp):
        d = _sft_copy(fx, tmp)
        size = os.path.getsize(d / name)
        truncate(d / name, size - cut)
        return sft_data(d), [f"{d / name}: {size - cut:,} bytes", f"says {size:,}", "truncated", "re-run"]
    return case


def _sft_meta_corrupt(fx, tmp):
    d = _sft_copy(fx, tmp)
    truncate(d / "meta.json", 40)
    return sft_data(d), [f"{d / 'meta.json'}: unreadable", "re-run"]


def _sft_offsets_corrupt(fx, tmp):
    d = _sft_copy(fx, tmp)
    truncate(d / "offsets.npy", 140)
    return sft_data(d), [f"{d / 'offsets.npy'}: unreadable", "re-run"]


def _sft_other_tokenizer(fx, tmp):
    return (sft_data(fx.sft, f"data.tokenizer={fx.bigger}", "model.vocab_size=512"),
            [f"{fx.sft} was prepared with tokenizer {fx.tok} (384 tokens)", f"not with data.tokenizer={fx.bigger}",
             "it has 512 tokens", f"--tokenizer {fx.bigger}"])


def _sft_twin_tokenizer(fx, tmp):
    return (sft_data(fx.sft, f"data.tokenizer={fx.twin}"),
            [f"prepared with tokenizer {fx.tok}", f"not with data.tokenizer={fx.twin}", "tokenizer.json differs",
             f"--tokenizer {fx.twin}"])


def _sft_vocab_too_small(fx, tmp):
    return sft_data(fx.sft, "model.vocab_size=300"), [f"{fx.sft} was prepared with tokenizer",
                                                      "set model.vocab_size to at least 384 (the tokenizer's size)"]


def _sft_seq_len(fx, tmp):
    return sft_data(fx.sft, "train.seq_len=8"), [f"{fx.sft}: a conversation has", "--seq-len 8"]


def _sft_valid_missing(fx, tmp):
    return (sft_data(fx.sft, f"data.sft_valid_path={tmp / 'no_valid'}"),
            [f"{tmp / 'no_valid'}: no such directory", "data.sft_valid_path names it"])


CASES = {
    "missing .bin and .idx": _missing_both,
    "missing .idx": _missing_idx,
    "missing .bin": _missing_bin,
    "prefix given with .bin": _prefix_with_extension,
    ".idx shorter than its header": _idx_shorter_than_header,
    ".idx bad magic": _idx_bad_magic,
    ".idx bad version": _idx_bad_version,
    ".idx truncated": _idx_truncated,
    ".bin truncated": _bin_truncated,
    ".bin longer than .idx says": _bin_longer,
    "empty dataset": _empty_dataset,
    "split leaves valid empty": _empty_valid_split,
    "empty valid_blend dataset": _empty_valid_blend_entry,
    "no tokenizer": _no_tokenizer,
    "tokenizer path missing": _tokenizer_missing,
    "not a tokenizer": _not_a_tokenizer,
    "tokenizer.json corrupt": _tokenizer_corrupt,
    "vocab smaller, padding covers": _vocab_smaller_padding_covers,
    "vocab much smaller": _vocab_much_smaller,
    "ids outside the tokenizer": _ids_outside_tokenizer,
    "cache dir under a file": _cache_dir_under_file,
    "sft dir missing": _sft_missing_dir,
    "sft meta.json missing": _sft_missing_meta,
    "sft tokens.bin missing": _sft_missing_file("tokens.bin"),
    "sft loss_mask.bin missing": _sft_missing_file("loss_mask.bin"),
    "sft offsets.npy missing": _sft_missing_file("offsets.npy"),
    "sft tokens.bin truncated": _sft_truncated("tokens.bin", 8),
    "sft loss_mask.bin truncated": _sft_truncated("loss_mask.bin", 3),
    "sft meta.json corrupt": _sft_meta_corrupt,
    "sft offsets.npy corrupt": _sft_offsets_corrupt,
    "sft other tokenizer": _sft_other_tokenizer,
    "sft same-size other tokenizer": _sft_twin_tokenizer,
    "sft vocab too small": _sft_vocab_too_small,
    "sft longer than seq_len": _sft_seq_len,
    "sft valid dir missing": _sft_valid_missing,
}


def test_good_data_passes(fx, tmp_path):
    before = snapshot(fx.root)
    check_data(load_recipe(TINY, indexed(fx, fx.ds)))
    check_data(load_recipe(TINY, indexed(fx, [(0.7, fx.ds), (0.3, fx.few)], 'data.split="1,0,0"',
                                         f"data.valid_blend={json.dumps([[1.0, str(fx.few)]])}")))
    check_data(load_recipe(TINY, sft_data(fx.sft, f"data.tokenizer={fx.tok}", f"data.sft_valid_path={fx.sft}")))
    check_data(load_recipe(TINY, []))  # synthetic: nothing to check
    assert snapshot(fx.root) == before
    meta = json.loads((fx.sft / "meta.json").read_text())
    assert meta["tokenizer_sha256"] == hashlib.sha256((fx.tok / "tokenizer.json").read_bytes()).hexdigest()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_is_refused_naming_file_and_fix(fx, tmp_path, case):
    overrides, fragments = CASES[case](fx, tmp_path)
    recipe = load_recipe(TINY, overrides)
    before = snapshot(fx.root, tmp_path)
    with pytest.raises(DataError) as err:
        check_data(recipe)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert snapshot(fx.root, tmp_path) == before, "check_data changed something on disk"


def test_sft_data_error_is_a_data_error(fx, tmp_path):
    """What the SFT reader raises late is the same class the entry point turns into exit 2."""
    assert issubclass(sft.SFTDataError, DataError) and issubclass(sft.SFTDataError, RuntimeError)
    d = _sft_copy(fx, tmp_path)
    truncate(d / "tokens.bin", 100)
    with pytest.raises(DataError, match="tokens.bin: 100 bytes"):
        sft.SFTDataset(d, SEQ, 0)


# ---- through tools/train.py --------------------------------------------------------------------
def assert_one_line_exit_2(proc: subprocess.CompletedProcess, fragments: list[str]) -> str:
    err = proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-2000:]}\n--- stderr\n{err[-4000:]}"
    assert "Traceback" not in err + proc.stdout, err[-4000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr is not one error line:\n{err[-4000:]}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


CLI_CASES = [".bin truncated", "missing .idx", "vocab smaller, padding covers", "split leaves valid empty",
             "sft tokens.bin truncated"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_train_cli_refuses_bad_data_before_building(fx, tmp_path, case):
    overrides, fragments = CASES[case](fx, tmp_path)
    out = tmp_path / "run"
    before = snapshot(fx.root, tmp_path)
    proc = subprocess.run([sys.executable, "tools/train.py", "recipes/tiny.yaml", *overrides,
                           f"train.output_dir={out}", "train.tensorboard=false"],
                          env=cpu_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert_one_line_exit_2(proc, fragments)
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists(), "something was built"
    assert snapshot(fx.root, tmp_path) == before


# ---- unwritable outputs of the data tools ------------------------------------------------------
def run_tool(script: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / script), *map(str, args)], cwd=ROOT,
                          env=cpu_env(HF_HUB_OFFLINE=1), capture_output=True, text=True, timeout=120)


def test_preprocess_output_under_a_file(fx, tmp_path):
    before = snapshot(fx.root)
    proc = run_tool("preprocess_data.py", "--input", fx.docs, "--output-prefix", fx.afile / "out" / "ds",
                    "--tokenizer", fx.tok, "--workers", 1, "--no-progress")
    assert_one_line_exit_2(proc, [f"--output-prefix {fx.afile / 'out' / 'ds'}", f"{fx.afile} is a file",
                                  "choose a writable location"])
    assert snapshot(fx.root) == before


def test_preprocess_failed_run_keeps_an_earlier_dataset(fx, tmp_path):
    """An earlier dataset under the prefix is left byte for byte when a run over it fails: on bad
    input (now exit 2), and when its .idx name is taken by a directory (refused before tokenizing)."""
    prefix = copy_dataset(fx.ds, tmp_path / "out")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "unterminated\n')
    before = snapshot(tmp_path, fx.root)
    proc = run_tool("preprocess_data.py", "--input", bad, "--output-prefix", prefix, "--tokenizer", fx.tok,
                    "--workers", 1, "--no-progress", "--overwrite")
    assert_one_line_exit_2(proc, [f"{bad}:2: malformed JSON", "--on-error skip"])
    assert snapshot(tmp_path, fx.root) == before

    other = tmp_path / "taken"
    (tmp_path / "taken.idx").mkdir()
    before = snapshot(tmp_path, fx.root)
    with pytest.raises(pp.PreprocessError, match=r"taken\.idx is a directory"):
        pp.preprocess([fx.docs], str(other), str(fx.tok), progress=False)
    assert snapshot(tmp_path, fx.root) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory anyway")
def test_preprocess_output_in_read_only_dir(fx, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(pp.PreprocessError, match=f"{ro} is not writable"):
            pp.preprocess([fx.docs], str(ro / "ds"), str(fx.tok), progress=False)
        assert not list(ro.iterdir())
    finally:
        ro.chmod(0o755)


def test_unwritable_reports_the_blocking_path(tmp_path):
    assert pp.unwritable(tmp_path / "new" / "deeper") is None  # creatable; nothing created to find out
    assert not (tmp_path / "new").exists()
    (tmp_path / "f").write_text("x")
    assert pp.unwritable(tmp_path / "f" / "a" / "b") == f"{tmp_path / 'f'} is a file, not a directory, so " \
                                                        f"{tmp_path / 'f' / 'a' / 'b'} cannot be created"


@pytest.mark.parametrize("where", ["under a file", "is a file"])
def test_prepare_sft_out_unwritable(fx, tmp_path, where):
    out = fx.afile / "sft" if where == "under a file" else fx.afile
    before = snapshot(fx.root)
    proc = run_tool("prepare_sft.py", fx.chats, "--tokenizer", fx.tok, "--out", out, "--seq-len", SEQ)
    assert_one_line_exit_2(proc, [f"--out {out}", f"{fx.afile} is a file", "choose a writable directory"])
    assert snapshot(fx.root) == before


def test_prepare_sft_missing_input_creates_nothing(fx, tmp_path):
    proc = run_tool("prepare_sft.py", tmp_path / "nope.jsonl", "--tokenizer", fx.tok, "--out", tmp_path / "out",
                    "--seq-len", SEQ)
    assert_one_line_exit_2(proc, [f"{tmp_path / 'nope.jsonl'}: no such input file"])
    assert not (tmp_path / "out").exists()


def test_tokenizer_load_failures_name_the_file(fx, tmp_path):
    shutil.copytree(fx.tok, tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON"):
        load_tokenizer(tmp_path / "tok")
    (tmp_path / "bad.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match=r"bad\.model: cannot be read as a sentencepiece model"):
        load_tokenizer(tmp_path / "bad.model")
