"""Shared helpers: launch real multi-process training runs on CPU/gloo and read their metrics."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from megatron_ext.errors import free_port  # noqa: F401  (tests import it from here)

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny.yaml"
# Every process a test starts (tools, torchrun ranks, SLURM jobs: sbatch exports the environment)
# imports this checkout's megatron_ext, whichever checkout the venv's editable install points at.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


def _restored_environment():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# A test (or a module's fixture) that starts torch.distributed or a tool's main() in this process
# sets RANK, WORLD_SIZE, MASTER_PORT...: later tests' subprocesses (and SLURM jobs: sbatch exports
# the environment) must not inherit them, or a 2-task srun step reads RANK and sees a world of 1,
# and a single-process run binds the port this process's store still holds.
_environment_per_test = pytest.fixture(autouse=True)(_restored_environment)
_environment_per_module = pytest.fixture(autouse=True, scope="module")(_restored_environment)


def cpu_env(**extra) -> dict:
    env = {**os.environ, "GAPERON_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(ROOT)}
    env.pop("RANK", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launch(nproc: int, args: list[str], timeout: int = 600, env: dict | None = None,
           check: bool = True) -> subprocess.CompletedProcess:
    """torchrun ``nproc`` CPU ranks of tools/train.py (or another script given as args[0])."""
    script = args[0] if args and args[0].endswith(".py") else str(ROOT / "tools" / "train.py")
    rest = args[1:] if args and args[0].endswith(".py") else args
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", "--master-addr=127.0.0.1", script, *rest]
    proc = subprocess.run(cmd, cwd=ROOT, env=env or cpu_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(out_dir: Path, key: str = "loss") -> list[float]:
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def per_step(out_dir: Path, key: str = "loss") -> dict[int, float]:
    """The last value logged for each step (a resumed run logs the re-done steps again)."""
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def layout_overrides(tp=1, pp=1, dp=1, zero=0, vpp=1, **extra) -> list[str]:
    out = [f"layout.tp={tp}", f"layout.pp={pp}", f"layout.dp={dp}", f"layout.zero_stage={zero}",
           f"layout.vpp={vpp}"]
    return out + [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]


@pytest.fixture
def tiny_recipe() -> Path:
    return TINY


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    """The offline fr/en/code demo corpus, 60 kB per language (preprocessing tests)."""
    from megatron_ext.corpus import build_demo_corpus

    return build_demo_corpus(tmp_path_factory.mktemp("demo"), max_bytes_per_lang=60_000)


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory) -> Path:
    """A 512-token BPE trained on :func:`corpus`."""
    from megatron_ext.tokenizer import train_tokenizer

    return train_tokenizer(list(corpus.values()), tmp_path_factory.mktemp("tok") / "bpe", vocab_size=512)


# The engine parity matrix's settings (tests/test_engine_parity.py), shared with runs reused elsewhere.
PARITY_STEPS = 10
PARITY_COMMON = [f"train.steps={PARITY_STEPS}", "train.precision=fp32", "layout.micro_batch=2",
                 "layout.global_batch=8", "train.tensorboard=false"]


@pytest.fixture(scope="session")
def olmo2_tp2pp2(tmp_path_factory) -> Path:
    """tiny with OLMo-2 blocks trained 10 steps at tp 2, pp 2 with sequence parallelism (fp32):
    one launch that is both a parity-matrix case and the run the OLMo-2 HF export starts from."""
    out = tmp_path_factory.mktemp("olmo2-tp2pp2") / "run"
    launch(4, [str(TINY), *PARITY_COMMON, "model.block=olmo2", *layout_overrides(2, 2, 1, 1),
               "layout.sequence_parallel=true", f"train.output_dir={out}"])
    return out


# ---- the bad-input batteries' good data (built once per session, damaged as copies) ------------
BAD_VOCAB = 384  # the fixture tokenizer's size (a multiple of 128: no padding)
BAD_SEQ = 64
BAD_WORDS = ("apple stone river cloud tiger lemon piano rocket forest candle mirror garden "
             "amber bridge castle desert engine falcon glacier harbor island jungle").split()


def bad_texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(BAD_WORDS) for _ in range(rng.randint(15, 60))) for _ in range(n)]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_indexed(prefix: Path, docs: list[list[int]], vocab: int) -> None:
    """A dataset written by megatron-core's own builder (any ids, or none at all)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(vocab))
    for ids in docs:
        builder.add_document(np.asarray(ids, dtype=np.int32), [len(ids)])
    builder.finalize(f"{prefix}.idx")


@pytest.fixture(scope="session")
def bad_data_fixture(tmp_path_factory) -> SimpleNamespace:
    """Good data to damage (tests/test_bad_data.py, test_bad_tools.py): tokenizers, datasets, SFT data."""
    from megatron_ext import preprocess as pp
    from megatron_ext import sft
    from megatron_ext.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("bad_data")
    docs = write_jsonl(root / "docs.jsonl", [{"text": t} for t in bad_texts(0, 300)])
    tok = train_tokenizer([docs], root / "tok", vocab_size=BAD_VOCAB)
    # same size, other merges (another corpus): the sha256 recorded in meta.json tells them apart
    other_text = write_jsonl(root / "other.jsonl", [{"text": t.upper()} for t in bad_texts(1, 300)])
    twin = train_tokenizer([other_text], root / "tok_twin", vocab_size=BAD_VOCAB)
    bigger = train_tokenizer([other_text], root / "tok_512", vocab_size=512)
    pp.preprocess([docs], str(root / "ds"), str(tok), workers=1, progress=False)
    few = write_jsonl(root / "few.jsonl", [{"text": t} for t in bad_texts(2, 3)])
    pp.preprocess([few], str(root / "few"), str(tok), workers=1, progress=False)
    write_indexed(root / "empty", [], BAD_VOCAB)
    write_indexed(root / "high_ids", [[5, 450, 7, 300], [1, 2, 3]], 512)  # 450: not a fixture-tokenizer id
    (root / "afile").write_text("a regular file, not a directory\n")
    chats = []
    for text in bad_texts(3, 60):
        words = text.split()[:6]
        chats.append({"messages": [{"role": "user", "content": "reverse: " + " ".join(words)},
                                   {"role": "assistant", "content": " ".join(reversed(words))}]})
    chats_file = write_jsonl(root / "chats.jsonl", chats)
    sft.prepare([str(chats_file)], str(tok), str(root / "sft"), BAD_SEQ)
    return SimpleNamespace(root=root, tok=tok, twin=twin, bigger=bigger, ds=root / "ds", few=root / "few",
                           empty=root / "empty", high_ids=root / "high_ids", sft=root / "sft", chats=chats_file,
                           docs=docs, afile=root / "afile")
