"""Bad input to the tools, round 3 (issue 29): each case ends with exit status 2 and one `error:` line
naming the value, the file or the option and the fix, no traceback, and every file on disk is
byte-identical afterwards (sha256 of the trees involved). Fast: the tools' `main(argv)` run in this
process (their exit code, their stderr), on the session's shared good data (conftest); only the
launcher's rank path starts processes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import BAD_SEQ as SEQ, ROOT, TINY, cpu_env

from megatron_ext import preprocess as pp
from megatron_ext import sft


def snapshot(*dirs: Path) -> dict[str, str]:
    import hashlib

    out = {}
    for d in dirs:
        for p in sorted(Path(d).rglob("*")):
            out[str(p)] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def call(main, argv: list, capsys) -> tuple[int, str, str]:
    """A tool's main(argv) in this process: (exit code, stdout, stderr); argparse's exit included."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code: int, err: str, needles: list[str], expect: int = 2) -> str:
    assert code == expect, f"exit {code}, stderr:\n{err[-3000:]}"
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr is not one error line:\n{err[-3000:]}"
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def _sys_is_read_only() -> bool:
    try:
        fd, probe = tempfile.mkstemp(dir="/sys")
    except OSError:
        return True
    os.close(fd)
    os.unlink(probe)
    return False


READ_ONLY = "/sys"  # creating a file there fails for root too (a chmod 555 directory does not)
needs_read_only = pytest.mark.skipif(not _sys_is_read_only(), reason="/sys is writable here")


@pytest.fixture
def fx(bad_data_fixture):
    return bad_data_fixture


# ---- preprocess_data ---------------------------------------------------------------------------
def _preprocess(fx, tmp, *extra):
    from megatron_ext.cli.preprocess import main

    return main, ["--input", fx.docs, "--tokenizer", fx.tok, "--no-progress", *extra]


PREPROCESS = {
    "--workers 0": (["--output-prefix", "{tmp}/ds", "--workers", "0"], ["--workers", "'0'", "integer >= 1"]),
    "--workers -3": (["--output-prefix", "{tmp}/ds", "--workers", "-3"], ["--workers", "'-3'", "integer >= 1"]),
    "--shard -1/2": (["--output-prefix", "{tmp}/ds", "--shard", "-1/2"], ["--shard", "'-1/2'", "0 <= I < N"]),
    "--shard 2/2": (["--output-prefix", "{tmp}/ds", "--shard", "2/2"], ["--shard", "'2/2'", "0 <= I < N"]),
    "prefix under a read-only place": (["--output-prefix", f"{READ_ONLY}/gaperon/new/ds", "--workers", "1"],
                                       ["--output-prefix", f"cannot create {READ_ONLY}/gaperon/new",
                                        f"{READ_ONLY} is not writable", "choose a writable location"]),
    "prefix holds a dataset": (["--output-prefix", "{tmp}/held", "--workers", "1"],
                               ["--output-prefix {tmp}/held", "already hold a dataset of 300 documents",
                                "--overwrite"]),
}


@pytest.mark.parametrize("case", list(PREPROCESS))
def test_preprocess_refuses(fx, tmp_path, capsys, case):
    if "read-only" in case and not _sys_is_read_only():
        pytest.skip("/sys is writable here")
    args, needles = PREPROCESS[case]
    for ext in (".bin", ".idx"):
        shutil.copyfile(f"{fx.ds}{ext}", tmp_path / f"held{ext}")
    main, argv = _preprocess(fx, tmp_path, *[a.format(tmp=tmp_path) for a in args])
    before = snapshot(tmp_path, fx.root)
    code, _, err = call(main, argv, capsys)
    assert_one_line(code, err, [n.format(tmp=tmp_path) for n in needles])
    assert snapshot(tmp_path, fx.root) == before


def test_merge_refuses_a_prefix_holding_another_dataset(fx, tmp_path, capsys):
    """merge onto PREFIX.bin/.idx that are not these parts merged is refused without --overwrite;
    merging the same parts again (a resubmitted merge job) is not."""
    from megatron_ext.cli.preprocess import main

    few = fx.root / "few.jsonl"
    prefix = tmp_path / "mix"
    pp.preprocess([few], str(prefix), str(fx.tok), shard=(0, 1), progress=False)
    for ext in (".bin", ".idx"):
        shutil.copyfile(f"{fx.ds}{ext}", f"{prefix}{ext}")
    before = snapshot(tmp_path, fx.root)
    code, _, err = call(main, ["merge", "--output-prefix", prefix], capsys)
    assert_one_line(code, err, [f"--output-prefix {prefix}", "already hold a dataset of 300 documents",
                                "not these 1 parts merged", "--overwrite"])
    assert snapshot(tmp_path, fx.root) == before
    assert call(main, ["merge", "--output-prefix", prefix, "--overwrite"], capsys)[0] == 0
    merged = snapshot(tmp_path)
    assert call(main, ["merge", "--output-prefix", prefix], capsys)[0] == 0  # the same merge again
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.endswith(".report.json")} == \
        {k: v for k, v in merged.items() if not k.endswith(".report.json")}


# ---- plan ------------------------------------------------------------------------------------------
PLAN = {
    "--gpu-memory -80GiB": (["recipes/tiny.yaml", "--gpu-memory", "-80GiB"],
                            ["--gpu-memory", "'-80GiB' is not a size", "80GiB"]),
    "--gpus 10^11 --search": (["recipes/8b.yaml", "--gpus", str(10**11), "--search"],
                              [f"--gpus {10**11}", "no layout of recipes/8b.yaml uses exactly", "global_batch",
                               "e.g. 64"]),
    "--epochs, datasets missing": (["recipes/tiny.yaml", "--epochs", "data.kind=indexed", "data.tokenizer={tok}",
                                    'data.blend=[[1.0, "{tmp}/absent_a"], [1.0, "{tmp}/absent_b"]]'],
                                   ["--epochs: 2 data.blend dataset(s)", "not found", "{tmp}/absent_a",
                                    "{tmp}/absent_b", "preprocess them"]),
}


@pytest.mark.parametrize("case", list(PLAN))
def test_plan_refuses(fx, tmp_path, capsys, case):
    from megatron_ext.cli.plan import main

    args, needles = PLAN[case]
    fmt = dict(tmp=tmp_path, tok=fx.tok)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        before = snapshot(tmp_path, ROOT / "recipes")
        code, _, err = call(main, [a.format(**fmt) for a in args], capsys)
    finally:
        os.chdir(cwd)
    assert_one_line(code, err, [n.format(**fmt) for n in needles])
    assert snapshot(tmp_path, ROOT / "recipes") == before


# ---- prepare_sft -----------------------------------------------------------------------------------
def _chat_files(tmp: Path) -> None:
    (tmp / "syntax.jinja").write_text("{% for m in messages %}\n{{ m.content }\n{% endfor %}")
    (tmp / "no_turns.jinja").write_text("{{ bos_token }}hello\n")
    (tmp / "dup.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "role": "user", "content": "x"}]}\n')
    (tmp / "foreign").mkdir()
    (tmp / "foreign" / "keep.txt").write_text("not SFT data\n")


SFT = {
    "--seq-len 0": (["--seq-len", "0"], ["--seq-len 0 must be >= 1", "train.seq_len"]),
    "--workers 0": (["--workers", "0"], ["--workers 0 must be >= 1"]),
    "--chat-template missing": (["--chat-template", "{tmp}/nope.jinja"],
                                ["--chat-template {tmp}/nope.jinja: no such file"]),
    "--chat-template Jinja syntax error": (["--chat-template", "{tmp}/syntax.jinja"],
                                           ["--chat-template {tmp}/syntax.jinja", "Jinja syntax error at line 2",
                                            "fix the template"]),
    "--chat-template renders no turn": (["--chat-template", "{tmp}/no_turns.jinja"],
                                        ["--chat-template {tmp}/no_turns.jinja", "renders no message contents",
                                         "fix the template"]),
    "duplicated JSON key (--strict)": (["--strict", "--input-file", "{tmp}/dup.jsonl"],
                                       ["{tmp}/dup.jsonl:1", "key 'role' appears twice"]),
    "--out a foreign non-empty directory": (["--out", "{tmp}/foreign"],
                                            ["--out {tmp}/foreign is not empty and not an earlier prepare_sft "
                                             "output", "keep.txt", "new or empty directory"]),
}


@pytest.mark.parametrize("case", list(SFT))
def test_prepare_sft_refuses(fx, tmp_path, capsys, case):
    from megatron_ext.cli.prepare_sft import main

    _chat_files(tmp_path)
    args = [a.format(tmp=tmp_path) for a in SFT[case][0]]
    inputs = [fx.chats]
    if "--input-file" in args:
        i = args.index("--input-file")
        inputs = [args[i + 1]]
        del args[i:i + 2]
    opts = {"--out": str(tmp_path / "out"), "--seq-len": str(SEQ)}
    for key in list(opts):
        if key in args:
            opts.pop(key)
    argv = [*inputs, "--tokenizer", fx.tok, *[x for kv in opts.items() for x in kv], *args]
    before = snapshot(tmp_path, fx.root)
    code, _, err = call(main, argv, capsys)
    assert_one_line(code, err, [n.format(tmp=tmp_path) for n in SFT[case][1]])
    assert snapshot(tmp_path, fx.root) == before  # no --out directory made, nothing written


def test_prepare_sft_skips_duplicated_keys_and_rewrites_its_own_output(fx, tmp_path):
    """Without --strict a record with a key twice is skipped and counted as bad JSON (plain json
    would keep the last value: an assistant turn silently becoming a user turn); an earlier
    prepare_sft output may be prepared again in place."""
    src = tmp_path / "mixed.jsonl"
    good = fx.chats.read_text().splitlines()[:5]
    src.write_text("\n".join([*good[:2], '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", '
                              '"role": "user", "content": "a"}]}', *good[2:]]) + "\n")
    out = tmp_path / "sft"
    shutil.copytree(fx.sft, out)
    summary = sft.prepare([str(src)], str(fx.tok), str(out), SEQ)
    assert summary.conversations == 5 and summary.skipped == {"bad_json": 1}
    assert any(f"{src}:3" in e and "'role' appears twice" in e for e in summary.examples)


# ---- evaluate, status, submit preprocess -------------------------------------------------------------
@needs_read_only
def test_evaluate_out_in_a_read_only_place(tmp_path, capsys):
    from megatron_ext.evaluate import main

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    before = snapshot(tmp_path)
    code, _, err = call(main, [hf, "--out", f"{READ_ONLY}/gaperon/eval"], capsys)
    assert_one_line(code, err, [f"--out {READ_ONLY}/gaperon/eval", f"{READ_ONLY} is not writable",
                                "choose a writable directory"])
    assert snapshot(tmp_path) == before


def _run_dir(tmp: Path) -> Path:
    run = tmp / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("train: {steps: 10\n")  # cut short: not YAML
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0, "lr": 0.1}\nnot json\n[1, 2]\n'
                                       '{"step": 2, "loss": 1.9, "lr": 0.1}\n{"step": 3, "lo')  # last: being written
    return run


@needs_read_only
def test_status_plot_in_a_read_only_place(tmp_path, capsys):
    from megatron_ext.status import main

    run = _run_dir(tmp_path)
    before = snapshot(tmp_path)
    code, _, err = call(main, [run, "--plot", f"{READ_ONLY}/gaperon/status.png"], capsys)
    assert_one_line(code, err, [f"--plot {READ_ONLY}/gaperon/status.png", f"{READ_ONLY} is not writable",
                                "writable directory"])
    assert snapshot(tmp_path) == before


def test_status_names_the_lines_it_skipped(tmp_path, capsys):
    from megatron_ext.status import main

    run = _run_dir(tmp_path)
    before = snapshot(tmp_path)
    code, out, err = call(main, [run], capsys)
    assert code == 0 and not err.strip(), err
    assert f"{run / 'metrics.jsonl'}: skipped lines 2, 3 (not a JSON object with a step)" in out, out
    assert f"{run / 'recipe.yaml'}: not valid YAML (line 2), skipped" in out, out
    code, out, _ = call(main, [run, "--json"], capsys)
    assert code == 0 and len(json.loads(out)["unreadable"]) == 2
    assert snapshot(tmp_path) == before


def test_submit_preprocess_refuses_a_missing_tokenizer(fx, tmp_path, capsys):
    from megatron_ext.cli.submit import main

    spec = tmp_path / "spec.yaml"
    spec.write_text(f"tokenizer: {tmp_path}/no-tokenizer\nsources: [{{name: web, inputs: [{fx.docs}], "
                    f"output_prefix: {tmp_path}/out/web}}]\n")
    before = snapshot(tmp_path, fx.root)
    code, _, err = call(main, ["preprocess", spec, "--cluster", "local", "--dry-run"], capsys)
    assert_one_line(code, err, ["source web", f"tokenizer {tmp_path}/no-tokenizer does not exist",
                                "every array task"])
    assert snapshot(tmp_path, fx.root) == before


# ---- the one-node launcher: tools/train.py --nproc-per-node N ---------------------------------------
@pytest.mark.parametrize("args, needles", [
    (["--nproc-per-node", "2", TINY, "train.steps=0"], ["train.steps=0 must be >= 1"]),
    (["--nproc-per-node", "2", TINY], ["--nproc-per-node 2", "tp x pp x dp = 1 x 1 x 1 = 1",
                                       "--nproc-per-node 1 or set layout.dp=2"]),
    (["--nproc-per-node", "0", TINY, "layout.dp=2"], ["--nproc-per-node 0 must be >= 1"]),
], ids=["bad recipe", "ranks do not match the layout", "no ranks"])
def test_launcher_refuses_before_any_rank(tmp_path, capsys, monkeypatch, args, needles):
    from megatron_ext.launch import main

    monkeypatch.delenv("RANK", raising=False)
    out = tmp_path / "run"
    before = snapshot(tmp_path)
    code, _, err = call(main, [*args, f"train.output_dir={out}"], capsys)
    assert_one_line(code, err, needles)
    assert snapshot(tmp_path) == before


RANK = """
import os, sys
from megatron_ext.launch import _refuse
rank = int(os.environ["RANK"])
sys.exit(_refuse(f"{sys.argv[1]} is in use by job 7 (every rank says so)") if sys.argv[2] == "bad" else 85)
"""


def test_launcher_ends_with_the_ranks_one_line(tmp_path):
    """Ranks that all fail on bad input: their line once and exit 2, not one line per rank, torchrun's
    ChildFailedError traceback and exit 1 (what plain torchrun shows). (Ranks that all end with
    another code, 85 = saved, requeue, end the launcher with it: the same branch.)"""
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-c", "import sys; from megatron_ext.launch import run_ranks; "
                           f"sys.exit(run_ranks(2, {str(script)!r}, ['RUN', 'bad']))"],
                          cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == ["error: RUN is in use by job 7 (every rank says so)"], proc.stderr
    assert snapshot(tmp_path) == before
