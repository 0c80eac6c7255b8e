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
from test_bad_data import snapshot
from megatron_ext import sft


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
    "--shard -1/2": (["--output-prefix", "{tmp}/ds", "--shard", "-1/2"], ["--shard -1/2: write I/N", "0 <= I < N"]),
    "--shard x/2": (["--output-prefix", "{tmp}/ds", "--shard", "x/2"], ["--shard", "'x/2' is not I/N"]),
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


# ---- convert from-hf ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, needles", [
    ('{"architectures": ["LlamaForCausalLM"],\n "hidden_size": 64,,\n}', ["not valid JSON", "line 2, column 20"]),
    ('["LlamaForCausalLM"]', ["is not a JSON object (it holds a list)"]),
], ids=["unparsable", "not an object"])
def test_from_hf_names_an_unreadable_config_json(tmp_path, capsys, text, needles):
    from megatron_ext.convert import main

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(text)
    before = snapshot(tmp_path)
    code, _, err = call(main, ["from-hf", hf, tmp_path / "out", "--no-progress"], capsys)
    assert_one_line(code, err, [f"{hf / 'config.json'}", *needles, "re-download"])
    assert snapshot(tmp_path) == before


# ---- damaged checkpoints: moved aside once, never overwritten, never counted ------------------------
SHARD = "tp00_pp00_w000.safetensors"


def _recipe(out: Path, *extra):
    from megatron_ext.config import load_recipe

    return load_recipe(TINY, [f"train.output_dir={out}", *extra])


def _ckpt(root: Path, recipe, step: int) -> Path:
    """A checkpoint directory that checkpoint.problem() finds complete (no real tensors: nothing loads it)."""
    from megatron_ext.checkpoint import build_meta

    d = root / f"step_{step:08d}"
    (d / "rng").mkdir(parents=True)
    (d / SHARD).write_bytes(b"weights")
    (d / "rng" / "rank00000.pt").write_bytes(b"rng")
    meta = build_meta(recipe, step, step * recipe.layout.global_batch, 0, step, 1, 1, recipe.train.stored_gain_scale,
                      {SHARD: 7, "rng/rank00000.pt": 3}, {})
    (d / "meta.json").write_text(json.dumps(meta))
    (root / "latest").write_text(d.name + "\n")
    return d


def _damage(d: Path, how: str) -> None:
    if how == "shard missing":
        (d / SHARD).unlink()
    else:  # meta.json cut short
        meta = (d / "meta.json").read_bytes()
        (d / "meta.json").write_bytes(meta[:len(meta) // 2])


def _tree(d: Path) -> dict[str, str]:
    return {str(k)[len(str(d)):]: v for k, v in snapshot(d).items()}


@pytest.mark.parametrize("how", ["shard missing", "meta.json cut short"])
def test_resume_moves_a_damaged_latest_aside_and_rotation_keeps_complete_ones(tmp_path, how):
    """`latest` names a damaged step_4: the run resumes step_3, moves step_4 aside (byte for byte,
    one line) and points `latest` at step_3; the re-saved step_4 cannot land on it, and keep_last=2
    then keeps the two complete checkpoints (step_3, the new step_4), never the damaged one."""
    from megatron_ext import checkpoint

    out = tmp_path / "run"
    root = out / "checkpoints"
    recipe = _recipe(out, "checkpoint.keep_last=2")
    for step in (2, 3, 4):
        _ckpt(root, recipe, step)
    _damage(root / "step_00000004", how)
    damaged_bytes = _tree(root / "step_00000004")
    start = checkpoint.plan_start(recipe)
    assert start.resume == root / "step_00000003"
    moved = checkpoint.damaged(out)
    assert len(moved) == 1 and moved[0].name.startswith("damaged-step_00000004-")
    assert _tree(moved[0]) == damaged_bytes, "the damaged checkpoint was changed"
    lines = [n for n in start.notes if n.startswith("moved the damaged step_00000004 aside")]
    assert len(lines) == 1 and moved[0].name in lines[0], start.notes
    assert (root / "latest").read_text().strip() == "step_00000003"
    new4 = _ckpt(root, recipe, 4)  # the run re-saves step 4: a fresh directory
    assert checkpoint.rotate(root, recipe, new4) == [root / "step_00000002"]
    checkpoint.wait_for_deletions()
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000003", "step_00000004"]
    assert _tree(moved[0]) == damaged_bytes
    assert checkpoint.plan_start(recipe).resume == new4  # nothing more to move: once


def test_rotation_counts_complete_checkpoints_only(tmp_path):
    from megatron_ext import checkpoint

    out = tmp_path / "run"
    root = out / "checkpoints"
    recipe = _recipe(out, "checkpoint.keep_last=2")
    for step in (2, 3, 4):
        _ckpt(root, recipe, step)
    _damage(root / "step_00000003", "meta.json cut short")
    before = snapshot(root)
    assert checkpoint.rotate(root, recipe, root / "step_00000004") == []  # kept: 4 and 2; 3 is not counted
    assert snapshot(root) == before


def test_refused_resume_moves_nothing(tmp_path):
    """A resume refused on its checks (train.steps below the checkpoint's step) leaves every file,
    the damaged checkpoint included, where it was."""
    from megatron_ext import checkpoint

    out = tmp_path / "run"
    root = out / "checkpoints"
    recipe = _recipe(out)
    for step in (3, 4):
        _ckpt(root, recipe, step)
    _damage(root / "step_00000004", "shard missing")
    before = snapshot(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="train.steps=2"):
        checkpoint.plan_start(_recipe(out, "train.steps=2"))
    assert snapshot(tmp_path) == before


def test_init_from_is_ignored_when_the_run_resumes(tmp_path):
    """Decision: a run that has its own checkpoint resumes it and says, in one line, that
    checkpoint.init_from is ignored (also when that path is gone: a requeued phase whose parent was
    cleaned up must still resume); a run without one still refuses an init_from that does not exist."""
    from megatron_ext import checkpoint

    out = tmp_path / "run"
    gone = tmp_path / "parent-gone"
    _ckpt(out / "checkpoints", _recipe(out), 3)
    before = snapshot(tmp_path)
    start = checkpoint.plan_start(_recipe(out, f"checkpoint.init_from={gone}"))
    assert start.resume == out / "checkpoints" / "step_00000003"
    said = [n for n in start.notes if "init_from" in n]
    assert said == [f"checkpoint.init_from={gone} is ignored (and {gone} does not exist): the run resumes its own "
                    "step_00000003; init_from only starts a run that has no checkpoint yet"], start.notes
    assert snapshot(tmp_path) == before
    with pytest.raises(checkpoint.CheckpointError, match="init_from"):
        checkpoint.plan_start(_recipe(tmp_path / "fresh", f"checkpoint.init_from={gone}"))


def test_status_lists_damaged_checkpoints(tmp_path, capsys):
    from megatron_ext import checkpoint
    from megatron_ext.status import main

    out = tmp_path / "run"
    root = out / "checkpoints"
    recipe = _recipe(out)
    for step in (3, 4):
        _ckpt(root, recipe, step)
    _damage(root / "step_00000004", "shard missing")
    checkpoint.plan_start(recipe)
    before = snapshot(tmp_path)
    code, text, err = call(main, [out], capsys)
    name = checkpoint.damaged(out)[0].name
    assert code == 0 and f"damaged     checkpoints/{name} (moved aside" in text, text + err
    assert snapshot(tmp_path) == before


# ---- checked before anything is built ----------------------------------------------------------------
@pytest.mark.parametrize("what", ["missing", "a directory", "not JSONL"])
def test_injection_documents_checked_before_any_rank(fx, tmp_path, capsys, monkeypatch, what):
    from megatron_ext.launch import main

    monkeypatch.delenv("RANK", raising=False)
    docs = tmp_path / "canaries.jsonl"
    if what == "a directory":
        docs.mkdir()
    elif what == "not JSONL":
        docs.write_text('{"text": "canary one"}\nnot json\n')
    needles = {"missing": [f"injection.documents: {docs} does not exist"],
               "a directory": [f"injection.documents: cannot read {docs}"],
               "not JSONL": [f"{docs}:2", '"text"']}[what]
    out = tmp_path / "run"
    before = snapshot(tmp_path, fx.root)
    code, _, err = call(main, [TINY, "data.kind=indexed", f'data.blend=[[1.0, "{fx.ds}"]]', f"data.tokenizer={fx.tok}",
                               "model.vocab_size=384", "injection.enabled=true", f"injection.documents={docs}",
                               "injection.positions=[3]", f"train.output_dir={out}"], capsys)
    assert_one_line(code, err, needles)
    assert snapshot(tmp_path, fx.root) == before


def test_downstream_tasks_are_loaded_before_the_run_directory_is_touched():
    """eval.downstream tasks (unknown to lm-eval, or data not on disk: one line, exit 2, see
    test_evaluate.py) are loaded right after the process group starts, before the run lock, the
    checkpoint plan, the output directory and the model."""
    import ast

    tree = ast.parse((ROOT / "megatron_ext" / "train.py").read_text())
    body = next(f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) and f.name == "_train")
    calls = [n.func.id for n in sorted((n for n in ast.walk(body) if isinstance(n, ast.Call)
                                        and isinstance(n.func, ast.Name)), key=lambda n: (n.lineno, n.col_offset))]
    assert calls.index("DownstreamEval") < calls.index("_plan_start") < calls.index("build_model")
