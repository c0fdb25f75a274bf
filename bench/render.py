"""The figures as text: the table of the headline figures, then the details that explain them
(``render``); the CUDA figures (``render_cuda``).
"""

from __future__ import annotations

from typing import Any

from harness import FIGURES


def render(figures: dict[str, Any]) -> str:
    """A readable table of the headline figures, then the details that explain them."""
    lines = []
    m = figures["machine"]
    lines.append(
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['torch_threads']} thread(s), "
        f"schedulefree {m['schedulefree'] or 'not installed'}"
    )
    lines.append("")
    lines.append(f"{'figure':34} {'value':>10}  {'target':>8}  met")
    for key in FIGURES:
        value = figures.get(key)
        target = figures["targets"].get(key, "")
        met = figures["met"].get(key)
        shown = "skipped" if value is None else f"{value:.4g}"
        flag = "" if met is None else ("yes" if met else "NO")
        lines.append(f"{key:34} {shown:>10}  {target:>8}  {flag}")
    lines.append("")
    ao = figures["audit_overhead"]
    for name in ("adamw", "sf-adamw"):
        o, mem = ao[name], figures["audit_extra_memory"][name]
        lines.append(
            f"audit, {ao['model']} batch {ao['batch']}, {name}: {o['plain_ms']:.2f} -> "
            f"{o['audited_ms']:.2f} ms/step (x{o['ratio']:.3f}); peak {mem['peak_bytes']} B "
            f"= {mem['fraction']:.4f} of {mem['param_bytes']} B of parameters"
        )
    ma = figures["metric_audit_overhead"]
    lines.append(
        f"sfdiag run machinery, {ma['model']} batch {ma['batch']}, {ma['optimizer']}, a grad "
        f"norm logged every step ({ma['logger']}): {ma['plain_ms']:.2f} -> "
        f"{ma['audited_ms']:.2f} ms/step (x{ma['ratio']:.3f}, paired x{ma['paired_ratio']:.3f}); "
        f"the norm read at a mid-step log {ma['at_log_us']:.0f} us ({ma['at_log_fraction']:.4f} "
        "of a step)"
    )
    mw = figures["mode_watch_overhead"]
    lines.append(
        f"schedule-free mode watching, {mw['model']} batch {mw['batch']}, {mw['optimizer']}: "
        f"{mw['without_ms']:.2f} -> {mw['with_ms']:.2f} ms/step (x{mw['ratio']:.3f}, paired "
        f"x{mw['paired_ratio']:.3f})"
    )
    dd = figures["ddp_audit_overhead"]
    lines.append(
        f"sfdiag run in a {dd['ranks']}-rank DDP job ({dd['backend']}), {dd['model']} global "
        f"batch {dd['global_batch']}, {dd['optimizer']}: {dd['plain_ms']:.2f} -> "
        f"{dd['audited_ms']:.2f} ms/step (x{dd['ratio']:.3f}, paired x{dd['paired_ratio']:.3f})"
    )
    cb = figures.get("callback_overhead")
    if cb:
        s = cb["seconds_cpu"]
        lines.append(
            f"the Lightning callback, {cb['steps']}-step trainer.fit, {cb['rounds']} rounds, CPU "
            f"time: sfdiag.audit() around it {s['audit']:.3f} s, the callback {s['callback']:.3f} "
            f"s (x{cb['callback_vs_audit_ratio']:.3f}, paired "
            f"x{cb['callback_vs_audit_paired']:.3f}); audit vs plain "
            f"x{cb['audit_vs_plain_ratio']:.3f}, a no-op callback vs plain "
            f"x{cb['noop_callback_vs_plain_ratio']:.3f}"
        )
    sf = figures["sf_adamw_step"]
    ms = ", ".join(f"{k} {v:.1f}" for k, v in sf["ms"].items())
    lines.append(
        f"sf-adamw step, {sf['numel'] / 1e6:.0f}M params in {sf['tensors']} tensors (ms): {ms}; "
        f"floor {sf['floor_ms']:.1f} ms at {sf['copy_bandwidth_gb_s']} GB/s"
    )
    sgd = figures["sf_sgd_step"]
    ms = ", ".join(f"{k} {v:.1f}" for k, v in sgd["ms"].items())
    lines.append(
        f"sf-sgd step, weight decay {sgd['weight_decay']} (ms): {ms}; "
        f"floor {sgd['floor_ms']:.1f} ms"
    )
    for name in ("sf_adamw_step_pinned_malloc", "sf_sgd_step_pinned_malloc"):
        pinned = figures.get(name)
        if pinned:
            ms = ", ".join(f"{k} {v:.1f}" for k, v in pinned["ms"].items())
            lines.append(
                f"{name} (ms): {ms}; vs release {pinned.get('vs_release')}, "
                f"vs floor {pinned['vs_floor']}"
            )
    ah = figures["audit_host"]
    for name in ("adamw", "sf-adamw"):
        o = ah[name]
        lines.append(
            f"the auditor on {o['tensors']} tiny tensors ({ah['model']}), {name}: "
            f"{o['plain_ms']:.2f} -> {o['audited_ms']:.2f} ms/step (hooks {o['pre_hook_ms']:.2f}"
            f" + {o['post_hook_ms']:.2f} ms, {o['params_mutated']} grads mutated): "
            f"{o['us_per_tensor']:.2f} us per tensor and snapshot"
        )
    rs = figures["run_step_host"]
    lines.append(
        f"sfdiag run, an unaudited step on the same {rs['tensors']} tensors, {rs['optimizer']}, "
        f"a grad norm logged ({rs['logger']}): {rs['plain_ms']:.2f} -> {rs['run_ms']:.2f} "
        f"ms/step: {rs['us_per_tensor']:.2f} us per tensor"
    )
    lv = figures["run_host_logged_value"]
    if lv:
        lines.append(
            f"sfdiag run, one logged value ({lv['grad_norms']} grad norms and "
            f"{lv['learning_rates']} rates a step, {lv['model']}, {lv['optimizer']}): "
            f"{lv['us_per_value']:.1f} us (beside the machinery's {lv['machinery_us_per_step']:.0f}"
            f" us a step; both over the values: {lv['with_minus_without_us_per_value']:.1f} us)"
        )
    hs = figures["sf_adamw_step_host"]
    ms = ", ".join(f"{k} {v:.2f}" for k, v in hs["ms"].items())
    lines.append(f"sf-adamw step on the same {hs['tensors']} tensors (ms): {ms}")
    cli = figures["cli"]
    one = cli["compare_one_thread"]
    lines.append(
        f"sfdiag compare: {cli['compare']['seconds']:.2f} s with torch's default threads"
        + (f", {one['seconds']:.2f} s with OMP_NUM_THREADS=1" if one else "")
        + f"; 'import sfdiag.cli' imports torch: {cli['cli_imports_torch']}"
    )
    lines.append("")
    lines.append(f"scaling: {figures['scaling']['model']}, {figures['scaling']['malloc']}")
    lines.append(
        f"{'params':>12} {'step ms':>9} {'audited':>9} {'ratio':>7} {'audit B':>9} "
        f"{'RSS MB':>8} {'+audit':>8}"
    )
    for row in figures["scaling"]["sizes"]:
        lines.append(
            f"{row['params']:>12,} {row['plain_step_ms']:>9.2f} {row['audited_step_ms']:>9.2f} "
            f"{row['audit_overhead_ratio']:>7.3f} {row['audit_peak_bytes']:>9} "
            f"{row['max_rss_plain_mb']:>8.1f} {row['max_rss_extra_mb']:>+8.1f}"
        )
    hooks = figures["audit_overhead_100m"].get("hooks")
    if hooks:
        lines.append(
            f"at {figures['audit_overhead_100m']['params']:,} parameters, thread CPU time: "
            f"pre-step hook {hooks['pre_hook_ms']:.1f} ms, post-step {hooks['post_hook_ms']:.1f}, "
            f"one plain read of the grads {hooks['grad_read_ms']:.1f}, a step "
            f"{hooks['step_ms']:.1f}: hooks x{hooks['hooks_over_step']:.3f} of the step, two "
            f"plain reads alone x{hooks['two_reads_over_step']:.3f}"
        )
    long_run = figures["run_overhead_long"]
    pairs, wall_pairs = long_run["chunk_pair_ratio"], long_run["wall_chunk_pair_ratio"]
    lines.append(
        f"a long sfdiag run: {long_run['steps_each']} steps a side ({long_run['audited_steps']} "
        f"audited) in {long_run['chunk_pairs']} pairs of {long_run['chunk_steps']}-step chunks, "
        f"grad norm logged every {long_run['logged_every']}: {long_run['plain_cpu_ms']:.2f} -> "
        f"{long_run['audited_cpu_ms']:.2f} ms/step in thread CPU time (x{long_run['ratio']:.4f}; "
        f"pairs {pairs['min']:.3f} / {pairs['median']:.3f} / {pairs['max']:.3f}), "
        f"{long_run['plain_ms']:.2f} -> {long_run['audited_ms']:.2f} in wall time "
        f"(x{long_run['wall_ratio']:.4f}; pairs {wall_pairs['min']:.3f} / "
        f"{wall_pairs['median']:.3f} / {wall_pairs['max']:.3f})"
    )
    lines.append(render_cuda(figures["cuda"]))
    lines.append("")
    lines.extend(f"note: {note}" for note in figures["notes"])
    return "\n".join(lines)


def _cuda_overhead_line(overhead: dict[str, Any]) -> str:
    hooks = overhead["hooks"]
    return (
        f"  audit overhead at {overhead['params']:,} parameters, batch {overhead['batch']}: "
        f"x{overhead['ratio']:.3f} (step {overhead['plain_ms']:.2f} ms; hooks "
        f"{hooks['pre_hook_ms']:.2f} + {hooks['post_hook_ms']:.2f} ms, one plain read "
        f"{hooks['grad_read_ms']:.2f} ms)"
    )


def render_cuda(cuda: dict[str, Any] | str) -> str:
    if isinstance(cuda, str):
        return f"cuda: {cuda}"
    step = cuda["sf_adamw_step"]
    ms = ", ".join(f"{k} {v:.2f}" for k, v in step["ms"].items())
    return "\n".join(
        [
            f"cuda: {cuda['device']}",
            _cuda_overhead_line(cuda["audit_overhead_100m"]),
            _cuda_overhead_line(cuda["audit_overhead_100m_large_batch"]),
            f"  sf-adamw step (ms): {ms}; vs release {step.get('vs_release')}, compiled vs "
            f"release {step.get('compiled_vs_release')}",
            f"  sfdiag compare --device cuda: {cuda['compare_cuda_seconds']:.2f} s",
        ]
    )
