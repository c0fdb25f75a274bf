"""Averages over steps are not wrong numbers: a gradient norm logged as the mean since it
was last logged, or as an exponential moving average, is ``averaged`` (a note); a value
that is neither stays ``unmatched``. The fit itself, then real TensorBoard runs."""

from __future__ import annotations

import json
import math
import random
import textwrap

import pytest

from sfdiag.run import RunOptions, judge, run_script
from sfdiag.run.judge import AverageFit, JudgedValue, NormReferences


def unmatched(step: int, logged: float, true: float = 1.0) -> JudgedValue:
    refs = NormReferences(step=step, pre_step=true, post_step=true)
    return JudgedValue(step, "AdamW", logged, refs, "unmatched", None)


def judged(step: int, logged: float, window: list[float]) -> JudgedValue:
    """As the judge has it: correct where it is the step's own norm, else unmatched."""
    refs = NormReferences(step=step, pre_step=window[-1], post_step=window[-1])
    verdict, matches = judge.judge_value(logged, refs, judge.DEFAULT_RTOL)
    return JudgedValue(step, "AdamW", logged, refs, verdict, matches)


def norms(count: int, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(0.5, 3.0) for _ in range(count)]


def observe_all(values: list[tuple[JudgedValue, list[float] | None]]) -> list[JudgedValue]:
    fit = AverageFit()
    out = []
    for value, window in values:
        out += fit.observe(value, window)
    return out + fit.flush()


@pytest.mark.parametrize("beta", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("every", [1, 5])
@pytest.mark.parametrize("start", ["zero", "first"])
def test_an_ema_logged_every_few_steps_is_averaged(beta, every, start):
    g = norms(40)
    ema = 0.0 if start == "zero" else g[0]
    values, window = [], []
    for step, norm in enumerate(g):
        if not (start == "first" and step == 0):
            ema = beta * ema + (1 - beta) * norm
        window.append(norm)
        if step % every == every - 1:
            values.append((judged(step, ema, window), list(window)))
            window = []
    out = observe_all(values)
    assert [v.step for v in out] == [v.step for v, _ in values]  # all of them, in order
    if start == "first" and every == 1:  # the EMA's first value is the first step's norm
        assert (out[0].verdict, out[0].matches) == ("correct", "pre-step")
        out = out[1:]
    assert {(v.verdict, v.matches) for v in out} == {("averaged", "ema")}


def test_a_mean_since_the_last_log_is_averaged_and_a_scaled_one_is_not():
    g = norms(30, seed=1)
    mean = [(unmatched(s, sum(g[s - 4 : s + 1]) / 5), g[s - 4 : s + 1]) for s in range(4, 30, 5)]
    assert {(v.verdict, v.matches) for v in observe_all(mean)} == {("averaged", "mean")}
    scaled = [(unmatched(v.step, v.logged * 1.1), w) for v, w in mean]
    assert {v.verdict for v in observe_all(scaled)} == {"unmatched"}


def test_values_that_no_single_coefficient_explains_stay_unmatched():
    g = norms(30, seed=2)
    noise = random.Random(3)
    values = [(unmatched(s, g[s] * noise.uniform(1.3, 2.0)), [g[s]]) for s in range(30)]
    assert {v.verdict for v in observe_all(values)} == {"unmatched"}
    # a value whose steps are not all known cannot be an average, nor wait for one
    fit = AverageFit()
    assert fit.observe(unmatched(0, 5.0), None)[0].verdict == "unmatched"


def test_a_value_off_an_ema_is_unmatched_and_the_ema_around_it_averaged():
    g = norms(20, seed=4)
    ema, values = 0.0, []
    for step, norm in enumerate(g):
        ema = 0.9 * ema + 0.1 * norm
        off = 2.0 if step == 10 else 1.0  # one value that is not what the EMA holds
        values.append((unmatched(step, ema * off), [norm]))
    verdicts = [v.verdict for v in observe_all(values)]
    assert verdicts[10] == "unmatched"
    assert verdicts[:10] == ["averaged"] * 10
    assert verdicts[13:] == ["averaged"] * 7  # found again once two values fit


def test_the_fit_finds_a_coefficient_where_the_error_only_touches_zero():
    # over a window of five steps the EMA need not be monotone in beta
    g = [0.3, 0.7, 0.2, 0.9, 0.25, 0.6, 0.35, 0.8, 0.2, 0.5]
    first = judge.ema_of(0.0, g[:5], 0.8)
    second = judge.ema_of(first, g[5:], 0.8)
    beta = judge.fit_ema([(0.0, g[:5], first), (first, g[5:], second)])
    assert beta == pytest.approx(0.8, rel=1e-4)
    assert judge.fit_ema([(0.0, g[:5], first), (first, g[5:], second * 1.5)]) is None
    assert judge.fit_ema([(math.nan, g, 1.0)]) is None


# A loop that logs each kind of average, and one value that is none.
LOOP = """\
    import sys, torch
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema, smooth, window = None, 0.0, []
    with SummaryWriter(sys.argv[1]) as writer:
        for step in range(30):
            optimizer.zero_grad()
            model(torch.randn(16, 8) * (1 + step % 3)).pow(2).mean().backward()
            norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9))
            window.append(norm)
            ema = norm if ema is None else 0.9 * ema + 0.1 * norm
            smooth = 0.8 * smooth + 0.2 * norm
            writer.add_scalar("grad_norm_ema", ema, step)
            writer.add_scalar("train/grad_norm", norm, step)
            if step % 5 == 4:
                writer.add_scalar("grad_norm_mean", sum(window) / len(window), step)
                writer.add_scalar("smooth/grad_norm", smooth, step)
                writer.add_scalar("scaled/grad_norm", 1.1 * sum(window) / len(window), step)
                window = []
            optimizer.step()
"""


def test_averages_a_script_logs_are_averaged_not_wrong(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(textwrap.dedent(LOOP))
    report_path = tmp_path / "r.json"
    argv = ["python", str(script), str(tmp_path / "tb")]
    code = run_script(argv, RunOptions(report=report_path, quiet=True))
    report = json.loads(report_path.read_text())
    metrics = {m["name"]: m for m in report["metrics"]}
    assert {n: (m["verdict"], m["matches"], m["steps_judged"]) for n, m in metrics.items()} == {
        "grad_norm_ema": ("averaged", "ema", 30),
        "train/grad_norm": ("correct", "pre-clip", 30),
        "grad_norm_mean": ("averaged", "mean", 6),
        "smooth/grad_norm": ("averaged", "ema", 6),
        "scaled/grad_norm": ("unmatched", None, 6),
    }
    assert "exponential moving average" in metrics["grad_norm_ema"]["advice"]
    assert "since it was last logged" in metrics["grad_norm_mean"]["advice"]
    assert code == 0
    # a note, not a failure: without the one wrong metric, --strict passes
    strict = run_script(argv, RunOptions(report=report_path, force=True, quiet=True, strict=True))
    assert strict == 1  # scaled/grad_norm
