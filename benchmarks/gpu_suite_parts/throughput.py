"""The trainer's throughput runs: tput_* (1.5b: bf16-mixed, bf16-pure, compile, TE, cuDNN, chunked
CE, as variants of one run) and the full-width proxies; Shapes fixes the steps and micro batch they share."""
from __future__ import annotations

from .metrics import attention_line, error_of, read_rows, throughput
from .planner import pick_micro_batch, plan_tools, planner_figures
from .runner import Suite


def train_run(s: Suite, name: str, size: str, extra: list[str], mb: int | None, budget: float,
              steps: int, warmup: int, layers: int | None = None) -> dict:
    """One throughput run of the real trainer; a failed one that looks like an OOM is retried at
    half the micro batch."""
    recipe = s.recipe(size)
    over_model = [f"model.num_layers={layers}"] if layers else []
    if s.dry:
        mb = mb or 2
    tried = []
    while True:
        d = s.fresh_dir(name)
        overrides = s.base_overrides(d, steps) + s.layout(mb) + over_model + extra
        res = s.run(name, [(s.train_cmd(recipe, overrides), s.env())], budget)[0]
        rows = read_rows(d)
        _, load_recipe = plan_tools(s)
        r = load_recipe(recipe, overrides)
        tokens_per_step = r.layout.global_batch * r.train.seq_len
        measured = throughput(rows, warmup, tokens_per_step)
        oom = "out of memory" in res["text"].lower() or "OutOfMemoryError" in res["text"]
        if res["rc"] != 0 and oom and mb > 1 and not res["timed_out"] and s.remaining() > budget / 2:
            tried.append(mb)
            mb //= 2
            continue
        break
    row = {"status": "ok" if res["rc"] == 0 and measured else "error",
           "size": f"tiny (for {size})" if s.dry else size, "recipe": recipe,
           "layers": r.model.num_layers, "seq_len": r.train.seq_len, "micro_batch": mb, "global_batch": r.layout.global_batch,
           "precision": r.train.precision, "attention": r.train.attention, "compile": r.train.compile,
           "attention_built": attention_line(res["text"]), "steps": steps, "warmup_steps": warmup,
           "seconds": res["seconds"], "log": res["log"], "overrides": overrides}
    if tried:
        row["oom_at_micro_batch"] = tried
    if res["rc"] != 0:
        row["error"] = error_of(res)
    row.update({k: v for k, v in measured.items() if k != "losses"})
    if measured.get("losses"):
        row["last_loss"] = measured["losses"][-1]
    try:
        row.update(planner_figures(s, recipe, overrides, measured))
    except Exception as err:  # noqa: BLE001 - the planner must not sink a measured figure
        row["planner_error"] = f"{type(err).__name__}: {err}"
    if row.get("planned_mem_gib") and row.get("peak_mem_gib"):
        row["plan_mem_error"] = row["planned_mem_gib"] / row["peak_mem_gib"] - 1
    if row.get("plan_step_s") and row.get("step_s"):
        row["plan_step_error"] = row["plan_step_s"] / row["step_s"] - 1
    return row


class Shapes:
    """Steps, warm-up and micro batch of the throughput runs (chosen once, shared by the 1.5b runs
    and the baseline so that every ratio compares the same batch)."""

    def __init__(self, s: Suite):
        self.steps, self.warmup = (4, 1) if s.dry else (10, 3)
        self.mb = None
        self.plan_note = None

    def micro_batch(self, s: Suite) -> int:
        if self.mb is None:
            if s.dry:
                self.mb = 2
            else:
                base = s.base_overrides(s.scratch / "probe", 1) + ["train.precision=bf16-mixed", "train.attention=sdpa"]
                self.mb, self.plan_note = pick_micro_batch(s, s.recipe("1.5b"), base)
        return self.mb


def tput(variant: dict, budget: float, warmup_extra: int = 0):
    def fn(s: Suite, shapes: Shapes) -> dict:
        if variant.get("needs") and not s.results["sections"].get("env", {}).get(variant["needs"]):
            return {"status": "skipped", "reason": f"{variant['needs']} not importable on this machine"}
        if variant.get("dry_skip") and s.dry:
            return {"status": "skipped", "reason": variant["dry_skip"]}
        mb = shapes.micro_batch(s)
        if not mb:
            return {"status": "error", "error": "the planner finds no micro batch that fits"}
        extra = [f"train.precision={variant['precision']}", f"train.attention={variant.get('attention', 'sdpa')}",
                 f"train.compile={str(variant.get('compile', False)).lower()}", *variant.get("extra", [])]
        row = train_run(s, variant["name"], "1.5b", extra, mb, budget, shapes.steps + warmup_extra,
                        shapes.warmup + warmup_extra)
        if shapes.plan_note:
            row["micro_batch_choice"] = shapes.plan_note
        return row
    return fn


def proxy(size: str, layer_options: tuple[int, ...], budget: float):
    def fn(s: Suite, shapes: Shapes) -> dict:
        extra = ["train.precision=bf16-mixed", "train.attention=sdpa", "train.compile=false"]
        if s.dry:
            return train_run(s, f"proxy_{size}", size, extra + ["model.num_layers=2"], 2, budget, shapes.steps, shapes.warmup)
        base = s.base_overrides(s.scratch / "probe", 1) + extra + ["layout.tp=1", "layout.sequence_parallel=false"]
        for layers in layer_options:
            mb, note = pick_micro_batch(s, s.recipe(size), base + [f"model.num_layers={layers}"])
            if mb:
                row = train_run(s, f"proxy_{size}", size, extra, mb, budget, shapes.steps, shapes.warmup, layers=layers)
                row["micro_batch_choice"] = note
                return row
        return {"status": "error", "error": f"no {layer_options}-layer proxy fits by the planner"}
    return fn
