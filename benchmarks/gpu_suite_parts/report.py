"""gpu_suite.md from gpu_suite.json's results; every lookup tolerates a missing section."""
from __future__ import annotations


def _f(v, fmt="{:.3g}"):
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, (int, float)):
        return fmt.format(v)
    return str(v)


def render_markdown(res: dict) -> str:
    meta, sec = res["meta"], res["sections"]
    env = sec.get("env", {})
    lines = [f"# GPU suite{' (DRY RUN on CPU: tiny shapes, figures are not GPU figures)' if meta.get('dry_run') else ''}",
             "", f"{meta.get('scale')}; started {meta.get('started')}, {meta.get('elapsed_s')} s of {meta.get('budget_s')} s budget.",
             f"Machine: {env.get('gpu', 'CPU')}; python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), "
             f"megatron-core {env.get('megatron.core')}, deepspeed {env.get('deepspeed')}, transformers {env.get('transformers')}, "
             f"TE {env.get('transformer_engine')}, flash-attn {env.get('flash_attn')}.", ""]
    lines += ["## Sub-steps", "", "| sub-step | status | seconds | note |", "|---|---|---|---|"]
    for name, v in sec.items():
        note = v.get("error") or v.get("reason") or ("; ".join(v.get("errors", [])) if v.get("errors") else "")
        lines.append(f"| {name} | {v.get('status')} | {_f(v.get('seconds'), '{:.0f}')} | {str(note)[:200]} |")
    c = sec.get("correctness_tiny", {})
    h = sec.get("correctness_hf", {})
    lines += ["", "## Correctness", "", "| check | value | criterion | pass |", "|---|---|---|---|",
              f"| tiny fp32, GPU vs CPU, {c.get('steps', 20)} steps: max rel loss diff per step | {_f(c.get('fp32_max_rel_diff'), '{:.2e}')} | <= 1e-3 | {_f(c.get('fp32_pass'))} |",
              f"| tiny bf16-mixed, GPU vs CPU: max rel loss diff | {_f(c.get('bf16_max_rel_diff'), '{:.2e}')} | bf16 noise (bf16 vs fp32 on CPU: {_f(c.get('bf16_vs_fp32_cpu_max_rel_diff'), '{:.2e}')}) | — |",
              f"| 1.5b shapes ({h.get('layers')} layers), fp32 first-step loss: trainer {_f(h.get('trainer_loss'), '{:.6f}')} vs HF export {_f(h.get('hf_loss'), '{:.6f}')} | {_f(h.get('rel_diff'), '{:.2e}')} rel | <= 1e-4 | {_f(h.get('pass'))} |"]
    runs = [(n, v) for n, v in sec.items() if n.startswith(("tput_", "proxy_")) and v.get("status") not in (None,)]
    lines += ["", "## Throughput (one GPU, dp=1, ZeRO-1, synthetic data, trainer metrics.jsonl after warm-up)", "",
              "| run | model | layers | seq | mb | precision | attention | compile | tokens/s | MFU | peak GiB | planned GiB | plan mem err | step s | plan step s @MFU | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, v in runs:
        lines.append(f"| {n} | {v.get('size', '')} | {_f(v.get('layers'))} | {_f(v.get('seq_len'))} | {_f(v.get('micro_batch'))} | "
                     f"{v.get('precision', '')} | {v.get('attention_built') or v.get('attention', '')} | {('on' if v['compile'] else 'off') if 'compile' in v else '—'} | "
                     f"{_f(v.get('tokens_per_s'), '{:.0f}')} | {_f(v.get('mfu') and 100 * v['mfu'], '{:.1f}%')} | "
                     f"{_f(v.get('peak_mem_gib'), '{:.2f}')} | {_f(v.get('planned_mem_gib'), '{:.2f}')} | "
                     f"{_f(v.get('plan_mem_error') is not None and 100 * v['plan_mem_error'] or None, '{:+.1f}%')} | "
                     f"{_f(v.get('step_s'), '{:.3f}')} | {_f(v.get('plan_step_s'), '{:.3f}')} | {v.get('status')} |")
    b = sec.get("baseline", {})
    lines += [f"| baseline | transformers LlamaForCausalLM | {_f(b.get('layers'))} | {_f(b.get('seq_len'))} | {_f(b.get('micro_batch'))} | "
              f"fp32 + bf16 autocast | sdpa | off | {_f(b.get('tokens_per_s'), '{:.0f}')} | {_f(b.get('mfu') and 100 * b['mfu'], '{:.1f}%')} | "
              f"{_f(b.get('peak_mem_gib'), '{:.2f}')} | — | — | {_f(b.get('step_s'), '{:.3f}')} | — | {b.get('status')} |", ""]
    mixed, pure = sec.get("tput_mixed", {}), sec.get("tput_pure", {})
    ratio = sec.get("planner", {}).get("goals", {}).get("ratio_vs_transformers")
    lines += ["## Goals", "", "| goal | measured | target |", "|---|---|---|",
              f"| 1.5b bf16-mixed MFU | {_f(mixed.get('mfu') and 100 * mixed['mfu'], '{:.1f}%')} | >= 45% |",
              f"| ours / transformers tokens/s | {_f(ratio, '{:.2f}x')} | >= 1.3x |",
              f"| 8b proxy MFU | {_f(sec.get('proxy_8b', {}).get('mfu') and 100 * sec['proxy_8b']['mfu'], '{:.1f}%')} | >= 50% |",
              f"| bf16-pure / bf16-mixed tokens/s | {_f(pure.get('tokens_per_s') and mixed.get('tokens_per_s') and pure['tokens_per_s'] / mixed['tokens_per_s'], '{:.2f}x')} | >= 1.0x |",
              f"| bf16-mixed - bf16-pure peak GiB | {_f(mixed.get('peak_mem_gib') and pure.get('peak_mem_gib') and mixed['peak_mem_gib'] - pure['peak_mem_gib'], '{:.2f}')} | planner: {_f(mixed.get('planned_mem_gib') and pure.get('planned_mem_gib') and mixed['planned_mem_gib'] - pure['planned_mem_gib'], '{:.2f}')} |",
              "| planner peak-memory error, every run | " + ", ".join(f"{n} {100 * v['plan_mem_error']:+.1f}%" for n, v in runs if v.get('plan_mem_error') is not None) + " | within 10% |",
              "", f"FLOPs: {meta.get('flops_note')}.", ""]
    sv = sec.get("sft_varlen", {})
    lines += [f"## Packed SFT attention (1.5b shapes, synthetic conversations, {sv.get('precision')})", "",
              "| path | tokens/s | trained tokens/s | step s | peak GiB | first-step loss |", "|---|---|---|---|---|---|"]
    for how, label in (("varlen", f"varlen ({sv.get('varlen_kernel')})"), ("dense", "dense [b, 1, s, s] mask")):
        v = sv.get(how, {})
        lines.append(f"| {label} | {_f(v.get('tokens_per_s'), '{:.0f}')} | {_f(v.get('trained_tokens_per_s'), '{:.0f}')} | "
                     f"{_f(v.get('step_s'), '{:.3f}')} | {_f(v.get('peak_mem_gib'), '{:.2f}')} | {_f(v.get('first_loss'), '{:.5f}')} |")
    lines += ["", f"varlen / dense tokens/s: {_f(sv.get('varlen_over_dense_tokens_per_s'), '{:.2f}x')}; first-step "
                  f"loss rel diff {_f(sv.get('first_loss_rel_diff'), '{:.1e}')}.", ""]
    return "\n".join(lines)
