"""One screen on a training run, from its files alone (``tools/status.py RUN_DIR``).

"Where is my run?" is asked while the job is queued, training, requeued or long finished, from a
login node with no GPU and no process group, so nothing here starts one: it reads what the
trainer and the SLURM script already write into the run directory (``train.output_dir``):

* ``recipe.yaml``: the recipe the run trains (written once its start has succeeded);
* ``metrics.jsonl``: one JSON object per logged step (loss, lr, tokens_per_s, valid_loss,
  skipped, ``eval/<task>/<metric>``); a resumed run logs its re-done steps again, so the last
  row of a step wins;
* ``checkpoints/``: the complete checkpoint a restart would resume (checkpoint.find's choice);
* ``run.lock``: the job or process that holds the run now (run_lock.py: squeue is asked about a
  SLURM job, a local pid is checked);
* ``slurm/<name>-<jobid>.out``: one ``=== <date> <time> job N: ...`` line per decision of
  slurm/train.sbatch.tmpl (allocation starts, requeues, crash restarts, how each one ended), amid
  the ranks' own output.

A line still being written is skipped. Only ``--plot`` writes anything (a PNG), and only it needs
matplotlib; torch is imported only when the run has a checkpoint to check.
"""
from __future__ import annotations

import json
import re
import shutil
import statistics
import time
from pathlib import Path

import yaml

from .errors import ArgParser, GaperonError, unwritable

RUN_FILES = ("recipe.yaml", "metrics.jsonl", "checkpoints", "slurm", "run.lock")
STEP_TIME_WINDOW = 20  # the ETA uses the median step time of this many recent logged steps

# The lines slurm/train.sbatch.tmpl writes (see its log() calls).
DECISION = re.compile(r"^=== (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) job (\S+): (.*)$")
START = re.compile(r"start on (\S+) \(restart (\d+): (\d+) of at most \d+ requeues, (\d+) of at most \d+ crash restarts\)")
ROUTINE = ("start on ", "MASTER_ADDR=", "srun exit ", "end, exit ", "batch shell got SIGTERM")
STEP_LINE = re.compile(r"^step\s+(\d+)(?:/\d+)? \|")  # rank 0's step lines (metrics.Logger)


class StatusError(GaperonError):
    """RUN_DIR cannot be read as a run directory; the message names the problem."""


# ---- reading ---------------------------------------------------------------------------------
def read_metrics(path: Path, unreadable: list[int] | None = None) -> list[dict]:
    """Every complete row of metrics.jsonl, in file order. A last line still being written (no
    newline yet) is skipped quietly; the numbers of other lines that are not a JSON object with an
    integer ``step`` go to ``unreadable``."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    rows = []
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
        elif unreadable is not None and line.strip() and not (n == len(lines) and not text.endswith("\n")):
            unreadable.append(n)
    return rows


def _lines(numbers: list[int], shown: int = 10) -> str:
    more = f" and {len(numbers) - shown} more" if len(numbers) > shown else ""
    return f"line{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers[:shown]))}{more}"


def last_per_step(rows: list[dict], key: str) -> dict[int, float]:
    """{step: value} of ``key``, the last row of each step winning (a resume re-logs steps)."""
    out = {}
    for r in rows:
        if isinstance(r.get(key), (int, float)) and not r.get("skipped"):
            out[r["step"]] = r[key]
    return dict(sorted(out.items()))


def _last(rows: list[dict], key: str) -> dict | None:
    return next((r for r in reversed(rows) if isinstance(r.get(key), (int, float)) and not r.get("skipped")), None)


def _recipe(text: str) -> dict | None:
    """A recipe's YAML as a plain tree, plus the parameter count when it still validates."""
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    if not isinstance(tree, dict):
        return None
    try:
        from .config import RecipeError, recipe_from_tree

        params = recipe_from_tree(tree, written=True).model.num_params()
    except (RecipeError, ValueError, TypeError):
        params = None  # written by another version of the schema: show what it says anyway
    return {"tree": tree, "params": params}


def _checkpoint(run: Path) -> tuple[dict | None, dict | None]:
    """The complete checkpoint a restart would resume, as checkpoint.find picks it, and its meta.json."""
    root = run / "checkpoints"
    # moved aside by a resume (checkpoint.format.move_aside): kept for inspection, never resumed
    damaged = sorted(p.name for p in root.glob("damaged-step_*"))
    if not any(root.glob("step_*")):
        return ({"path": None, "notes": [], "on_disk": 0, "damaged": damaged} if root.is_dir() else None), None
    from . import checkpoint  # imports torch: only for a run that has checkpoints

    found = checkpoint.find(run)
    info = {"path": None, "notes": found.notes, "on_disk": len(list(root.glob("step_*"))), "damaged": damaged}
    if found.path is None:
        return info, None
    try:
        meta = checkpoint.read_meta(found.path)
        saved_at = _clock((found.path / "meta.json").stat().st_mtime)
    except (checkpoint.CheckpointError, OSError) as err:  # rotated away or damaged since find() looked
        info["notes"].append(str(err))
        return info, None
    info.update(path=str(found.path), step=meta["step"], consumed_samples=meta.get("consumed_samples"),
                skipped_steps=meta.get("skipped_steps", 0), saved_at=saved_at)
    return info, meta


def _holder(run: Path) -> dict | None:
    """Who holds run.lock, and whether it is still alive (a dead holder was killed or crashed)."""
    from .run_lock import LOCK_NAME, describe, holder_alive

    try:
        owner = json.loads((run / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(owner, dict):
        return None
    return {"holder": describe(owner), "alive": holder_alive(owner)}


def read_slurm_logs(log_dir: Path) -> list[dict]:
    """Each job's decisions from its ``<name>-<jobid>.out``, oldest job first.

    Per job: the number of restarts, requeues and crash restarts its latest allocation started
    with (the script counts them), and every decision line but the routine ones, each with the
    last step rank 0 had logged in that allocation (None: none yet)."""
    jobs = []
    for path in log_dir.glob("*.out") if log_dir.is_dir() else []:
        job = {"log": path.name, "job": None, "nodes": None, "restarts": 0, "requeues": 0, "crash_restarts": 0,
               "events": []}
        step = None
        for line in path.read_text(errors="replace").splitlines():
            m = STEP_LINE.match(line)
            if m:
                step = int(m[1])
                continue
            m = DECISION.match(line)
            if not m:
                continue
            when, job["job"], what = m.groups()
            start = START.match(what)
            if start:
                job.update(nodes=start[1], restarts=int(start[2]), requeues=int(start[3]),
                           crash_restarts=int(start[4]))
                step = None
            elif not what.startswith(ROUTINE):
                job["events"].append({"time": when, "job": job["job"], "step": step, "what": what})
        if job["job"] is not None:
            jobs.append(job)
    return sorted(jobs, key=lambda j: (len(j["job"]), j["job"]))


# ---- the status --------------------------------------------------------------------------------
def collect(run_dir: str | Path) -> dict:
    """Everything the screen shows, as plain data (``--json`` prints it)."""
    run = Path(run_dir)
    if not run.exists():
        raise StatusError(f"{run} does not exist: give a run directory (the recipe's train.output_dir)")
    if not run.is_dir():
        raise StatusError(f"{run} is not a directory: give a run directory (the recipe's train.output_dir)")
    if not any((run / name).exists() for name in RUN_FILES):
        raise StatusError(f"{run} is not a run directory: it has none of {', '.join(RUN_FILES)} "
                          "(give the recipe's train.output_dir; a job that has not started yet has written nothing)")
    bad_lines: list[int] = []
    rows = read_metrics(run / "metrics.jsonl", bad_lines)
    unreadable = [f"{run / 'metrics.jsonl'}: skipped {_lines(bad_lines)} (not a JSON object with a step)"] \
        if bad_lines else []
    ckpt, meta = _checkpoint(run)
    try:
        text = (run / "recipe.yaml").read_text()
        recipe = _recipe(text)
        if recipe is None:
            try:
                yaml.safe_load(text)
                why = "not a YAML mapping"
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                why = f"not valid YAML{f' (line {mark.line + 1})' if mark else ''}"
            unreadable.append(f"{run / 'recipe.yaml'}: {why}, skipped")
    except FileNotFoundError:
        recipe = None
    except (OSError, UnicodeDecodeError) as err:
        recipe = None
        unreadable.append(f"{run / 'recipe.yaml'}: cannot be read ({getattr(err, 'strerror', None) or err}), skipped")
    if recipe is None and meta and isinstance(meta.get("recipe"), str):  # recipe.yaml lost: the checkpoint has it
        recipe = _recipe(meta["recipe"])
        if recipe:
            recipe["from_checkpoint"] = True
    tree = (recipe or {}).get("tree") or {}
    train, layout = tree.get("train", {}), tree.get("layout", {})
    steps = train.get("steps")
    tokens_per_step = (layout.get("global_batch") or 0) * (train.get("seq_len") or 0)

    step = rows[-1]["step"] if rows else (ckpt or {}).get("step", 0)
    last = {k: _last(rows, k) for k in ("loss", "valid_loss", "lr", "grad_norm", "tokens_per_s", "consumed_samples")}
    step_times = [tokens_per_step / r["tokens_per_s"] for r in rows[::-1]
                  if isinstance(r.get("tokens_per_s"), (int, float)) and r["tokens_per_s"] > 0][:STEP_TIME_WINDOW]
    step_time = statistics.median(step_times) if step_times and tokens_per_step else None
    left = max(0, steps - step) if steps is not None else None
    outcome = {r["step"]: bool(r.get("skipped")) for r in rows if "loss" in r}  # a re-done step's last try counts
    skipped = sorted(s for s, was_skipped in outcome.items() if was_skipped)
    evals = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("eval/") and isinstance(v, (int, float)):
                evals[k[len("eval/"):]] = {"step": r["step"], "value": v}

    holder = _holder(run)
    jobs = read_slurm_logs(run / "slurm")
    if holder and holder["alive"]:
        state = "running"
    elif steps is not None and step >= steps:
        state = "finished"
    elif not rows and not (ckpt or {}).get("path"):
        state = "not started"
    else:
        state = "stopped"
    metrics_path = run / "metrics.jsonl"
    logged_at = metrics_path.stat().st_mtime if metrics_path.exists() else None
    samples = (last["consumed_samples"] or {}).get("consumed_samples")
    return {
        "run_dir": str(run),
        "state": state,
        "holder": holder,
        "step": step,
        "steps": steps,
        "recipe": recipe,
        "checkpoint": ckpt,
        "last": {k: (None if r is None else {"step": r["step"], "value": r[k]}) for k, r in last.items()},
        "logged_at": _clock(logged_at) if logged_at else None,
        "logged_ago_s": time.time() - logged_at if logged_at else None,
        "tokens_seen": samples * train.get("seq_len", 0) if samples is not None else None,
        "tokens_total": steps * tokens_per_step if steps is not None else None,
        "step_time_s": step_time,
        "eta_s": left * step_time if step_time is not None and left is not None else None,
        "skipped_steps": skipped,
        "slurm_jobs": jobs,
        "evals": evals,
        "unreadable": unreadable,
        "straggler": _straggler(rows),
    }


def _straggler(rows: list[dict]) -> dict | None:
    """The latest straggler report (straggler.py): slowest rank, its node, its ratio to the median."""
    r = _last(rows, "straggler/ratio")
    if r is None:
        return None
    return {"step": r["step"], "ratio": r["straggler/ratio"], "rank": r.get("straggler/rank"),
            "node": r.get("straggler/node"), "flagged": r.get("straggler")}


# ---- the screen --------------------------------------------------------------------------------
def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def duration(s: float) -> str:
    """3.2 s, 4 min 10 s, 2 h 05 min, 3.4 d."""
    if s < 60:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    if s < 86400 * 2:
        return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
    return f"{s / 86400:.1f} d"


def _count(n: float) -> str:
    """1234567 -> 1.23M."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def _recipe_line(st: dict) -> str:
    rec = st["recipe"]
    if rec is None:
        return "no recipe.yaml yet (it is written once the run's start has succeeded)"
    tree = rec["tree"]
    m, t, o, s, d, lay = (tree.get(k, {}) for k in ("model", "train", "optimizer", "schedule", "data", "layout"))
    params = f", {_count(rec['params'])} params" if rec.get("params") else ""
    data = d.get("kind", "?") + (f" ({len(d['blend'])} datasets)" if d.get("blend") else "")
    where = " (from the checkpoint's meta.json: recipe.yaml is missing)" if rec.get("from_checkpoint") else ""
    return (f"{m.get('name', '?')}{params}; {t.get('steps')} steps x {lay.get('global_batch')} seqs x "
            f"{t.get('seq_len')} tokens; {t.get('precision')}; {s.get('kind')} lr {o.get('lr')} -> "
            f"{o.get('min_lr')}; data {data}{where}")


def _layout_line(tree: dict) -> str:
    lay = tree.get("layout")
    if not lay:
        return "unknown (no recipe)"
    tp, pp, dp = lay.get("tp", 1), lay.get("pp", 1), lay.get("dp", 1)
    ranks = tp * pp * dp
    return (f"tp {tp} x pp {pp} x dp {dp} = {ranks} rank{'s' if ranks > 1 else ''}; vpp {lay.get('vpp', 1)}, ZeRO {lay.get('zero_stage')}, "
            f"micro batch {lay.get('micro_batch')}, global batch {lay.get('global_batch')}"
            f"{', sequence parallel' if lay.get('sequence_parallel') else ''}"
            f"{', recompute ' + lay['recompute'] if lay.get('recompute', 'none') != 'none' else ''}")


def _state_line(st: dict) -> str:
    where = f"step {st['step']} of {st['steps'] if st['steps'] is not None else '?'}"
    ago = f" (last logged {duration(st['logged_ago_s'])} ago)" if st["logged_ago_s"] is not None else ""
    holder = st["holder"]
    if st["state"] == "running":
        return f"running, {where}{ago}: run.lock held by {holder['holder']}"
    text = {"finished": f"finished, {where}{ago}", "not started": "not started: nothing logged, no checkpoint",
            "stopped": f"stopped at {where}{ago}"}[st["state"]]
    if holder:  # the holder died without releasing it: killed (SIGKILL, OOM, node failure) or hung and killed
        text += f"; stale run.lock of {holder['holder']}, which has gone"
    jobs = st["slurm_jobs"]
    if st["state"] != "finished" and jobs and jobs[-1]["events"]:
        text += f"; last SLURM decision: {jobs[-1]['events'][-1]['what']}"
    return text


def _checkpoint_line(st: dict) -> str:
    ck = st["checkpoint"]
    if ck is None or (ck["path"] is None and not ck["on_disk"]):
        return "none yet" + (" (a restart starts from step 0)" if st["state"] != "finished" else "")
    if ck["path"] is None:
        return f"none complete among {ck['on_disk']} step_* dirs: {ck['notes'][-1] if ck['notes'] else ''}"
    path = Path(ck["path"])
    try:
        path = path.relative_to(st["run_dir"])
    except ValueError:
        pass
    behind = st["step"] - ck["step"]
    resumes = f"; a restart resumes here, {behind} steps back" if behind > 0 and st["state"] != "running" else ""
    return f"step {ck['step']}: {path} ({ck['on_disk']} on disk; saved {ck['saved_at']}){resumes}"


def _last_line(st: dict) -> str:
    last = st["last"]
    parts = []
    for key, label, fmt in (("loss", "loss", "{:.4f}"), ("valid_loss", "valid loss", "{:.4f}"), ("lr", "lr", "{:.3g}"),
                            ("grad_norm", "grad norm", "{:.3g}")):
        if last[key]:
            at = f" (step {last[key]['step']})" if key == "valid_loss" else ""
            parts.append(f"{label} {fmt.format(last[key]['value'])}{at}")
    if last["tokens_per_s"]:
        parts.append(f"{_count(last['tokens_per_s']['value'])} tokens/s")
    if not parts:
        return "nothing logged yet"
    return f"step {last['loss']['step'] if last['loss'] else st['step']}: " + ", ".join(parts)


def _progress_line(st: dict) -> str:
    if st["steps"] is None:
        return f"step {st['step']} (train.steps unknown: no recipe)"
    text = f"{st['step']} / {st['steps']} steps ({100 * st['step'] / max(st['steps'], 1):.0f}%)"
    if st["tokens_seen"] is not None and st["tokens_total"]:
        text += f", {_count(st['tokens_seen'])} of {_count(st['tokens_total'])} tokens"
    if st["state"] == "finished":
        return text + "; done"
    if st["eta_s"] is None:
        return text + "; ETA unknown (no step time logged yet)"
    eta = f"; ETA {duration(st['eta_s'])} at {st['step_time_s']:.3g} s/step (median of the last logged steps)"
    if st["state"] != "running":
        eta += ", once restarted"
    return text + eta


def _restart_lines(st: dict, width: int) -> list[str]:
    jobs = st["slurm_jobs"]
    if not jobs:
        return ["none seen: no SLURM logs in slurm/ (a run launched by hand logs no restarts)"]
    restarts = sum(j["restarts"] for j in jobs)
    crashes = sum(j["crash_restarts"] + sum("inside this allocation" in e["what"] for e in j["events"]) for j in jobs)
    requeues = sum(j["requeues"] for j in jobs)
    head = (f"{restarts} in {len(jobs)} job{'s' if len(jobs) > 1 else ''} ({requeues} requeue"
            f"{'s' if requeues != 1 else ''} after a save or by SLURM, {crashes} crash restart{'s' if crashes != 1 else ''})")
    lines = [head]
    events = [e for j in jobs for e in j["events"]]
    if len(events) > 8:
        lines.append(f"  ... {len(events) - 8} earlier decisions (see --json)")
    for e in events[-8:]:
        at = f" after step {e['step']}" if e["step"] is not None else " before any step"
        line = f"  {e['time'][5:]} job {e['job']}{at}: {e['what']}"
        lines.append(line if len(line) <= width else line[:width - 3] + "...")
    return lines


def render(st: dict, width: int | None = None) -> str:
    """The screen: one labelled line per topic (restarts and evals may take a few); SLURM decision
    lines are cut to ``width`` columns (default: the terminal's, 160 when not a terminal)."""
    width = (width or shutil.get_terminal_size((160, 24)).columns) - 12  # after the label column
    tree = (st["recipe"] or {}).get("tree") or {}
    skipped = st["skipped_steps"]
    rows = [("run", st["run_dir"]), ("state", _state_line(st)), ("recipe", _recipe_line(st)),
            ("layout", _layout_line(tree)), ("checkpoint", _checkpoint_line(st)), ("last log", _last_line(st)),
            ("progress", _progress_line(st)),
            ("skipped", f"{len(skipped)} (non-finite loss or gradient norm): steps "
                        f"{', '.join(map(str, skipped[-10:]))}" if skipped else "none")]
    strag = st.get("straggler")
    if strag:
        rows.append(("straggler", f"slowest rank {strag['rank']} on {strag['node']}: {strag['ratio']:.2f}x the median "
                                  f"step time (step {strag['step']})" + (f"; {strag['flagged']}" if strag["flagged"] else "")))
    for i, line in enumerate(_restart_lines(st, width)):
        rows.append(("restarts" if i == 0 else "", line))
    if st["evals"]:
        for i, (name, e) in enumerate(sorted(st["evals"].items())):
            rows.append(("eval" if i == 0 else "", f"{name} {e['value']:.4g} (step {e['step']})"))
    else:
        rows.append(("eval", "none logged"))
    if st["checkpoint"] and st["checkpoint"]["notes"] and st["checkpoint"]["path"]:
        rows += [("", f"  checkpoint note: {n}") for n in st["checkpoint"]["notes"]]
    for i, name in enumerate((st["checkpoint"] or {}).get("damaged") or []):
        rows.append(("damaged" if i == 0 else "", f"checkpoints/{name} (moved aside: never resumed or rotated; "
                                                   "delete it once inspected)"))
    for i, line in enumerate(st.get("unreadable") or []):
        rows.append(("unreadable" if i == 0 else "", line))
    return "\n".join(f"{label:<11} {text}".rstrip() for label, text in rows)


# ---- the plot ----------------------------------------------------------------------------------
def plot(run_dir: str | Path, png: str | Path, size=(8.0, 6.0), dpi: int = 100) -> dict[str, dict[int, float]]:
    """Loss and valid loss (top) and lr (bottom) against step, written to ``png``
    (``size`` inches x ``dpi``: 800 x 600 pixels by default); returns the plotted series."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run = Path(run_dir)
    rows = read_metrics(run / "metrics.jsonl")
    series = {key: last_per_step(rows, key) for key in ("loss", "valid_loss", "lr")}
    if not series["loss"] and not series["valid_loss"]:
        raise StatusError(f"{run / 'metrics.jsonl'} has no logged loss yet: nothing to plot")
    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    if series["loss"]:
        top.plot(list(series["loss"]), list(series["loss"].values()), color="tab:blue", lw=1.5, label="loss")
    if series["valid_loss"]:
        top.plot(list(series["valid_loss"]), list(series["valid_loss"].values()), color="tab:orange", lw=1.5,
                 marker="o", ms=4, label="valid loss")
    top.set_ylabel("loss")
    top.legend(loc="upper right")
    top.grid(alpha=0.3)
    top.set_title(f"{run.resolve().name}: step {rows[-1]['step']}")
    bottom.plot(list(series["lr"]), list(series["lr"].values()), color="tab:green", lw=1.5)
    bottom.set_ylabel("lr")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    bottom.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    fig.tight_layout()
    try:
        Path(png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(png)
    except OSError as err:
        raise StatusError(f"--plot {png}: cannot be written ({err.strerror or err}); pass --plot PATH in a "
                          "writable directory") from None
    return series


def main(argv: list[str] | None = None) -> int:
    import sys

    p = ArgParser(prog="status", description="Where a training run stands, from its files.")
    p.add_argument("run_dir", help="the run directory (the recipe's train.output_dir)")
    p.add_argument("--plot", nargs="?", const="", metavar="PNG",
                   help="also write loss / valid loss / lr curves to PNG (default RUN_DIR/status.png)")
    p.add_argument("--json", action="store_true", help="print the status as JSON instead of the screen")
    args = p.parse_args(argv)
    try:
        png = Path(args.plot or Path(args.run_dir) / "status.png") if args.plot is not None else None
        st = collect(args.run_dir)
        if png is not None:
            problem = png.is_dir() and f"{png} is a directory" or unwritable(png.parent)
            if problem:
                raise StatusError(f"--plot {png}: {problem}; pass --plot PATH in a writable directory")
            plot(args.run_dir, png)
            st["plot"] = str(png)
    except StatusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(st, indent=1, default=str))
    else:
        print(render(st))
        if "plot" in st:
            print(f"{'plot':<11} {st['plot']}")
    return 0

