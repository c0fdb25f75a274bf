"""``--plot``: the figures read back from their matplotlib objects (panels, titles, lines),
and the PNG's life cycle (validated before anything runs, atomic, never over a file)."""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
torch = pytest.importorskip("torch")

from conftest import cli_env, run_cli  # noqa: E402

import sfdiag  # noqa: E402
from sfdiag.api import compare_config, probe  # noqa: E402
from sfdiag.errors import SfdiagError  # noqa: E402
from sfdiag.report.plot import (  # noqa: E402
    FLAGGED,
    MARKERS,
    POST_LABEL,
    PRE_LABEL,
    grid_shape,
    optimizer_figure,
    run_figure,
)
from sfdiag.results import (  # noqa: E402
    MetricSeries,
    OptimizerResult,
    ProbeReport,
    StepRecord,
)

REPO = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


def panels(fig) -> list:
    return [ax for ax in fig.axes if ax.get_visible()]


def line(ax, label: str):
    (found,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return found


def is_red(text) -> bool:
    from matplotlib.colors import same_color

    return same_color(text.get_color(), FLAGGED)


def example(name: str):
    """An example script of the repository, imported as a module (its main(argv) drives it)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- layout and the bounded series ----------------------------------------------------------
@pytest.mark.parametrize(
    ("count", "shape"),
    [(1, (1, 1)), (2, (1, 2)), (4, (2, 2)), (5, (2, 3)), (9, (3, 3)), (10, (3, 4))],
)
def test_the_grid_grows_to_four_across(count, shape):
    assert grid_shape(count) == shape


@pytest.mark.parametrize("points", [10, 64, 65, 1_000, 100_000])
def test_a_metric_series_stays_bounded_and_evenly_spaced(points):
    series = MetricSeries(cap=64)
    for step in range(points):
        series.add(step, float(step), 2.0 * step, None)
    assert len(series) <= 64
    steps = list(series.steps)
    assert steps[0] == 0
    assert len({b - a for a, b in zip(steps, steps[1:], strict=False)}) <= 1  # even spacing
    assert points - 1 - steps[-1] < series.stride  # the end of the run is still there
    assert list(series.true) == [2.0 * s for s in steps]
    assert all(math.isnan(v) for v in series.other)


# ---- probe / compare / check: a panel per optimizer -----------------------------------------
@pytest.fixture(scope="module")
def mnist_compare() -> ProbeReport:
    return probe(compare_config(model="mnist-cnn", steps=4))


def test_compare_has_a_panel_per_optimizer_and_sf_adamws_gap_shows(mnist_compare):
    fig = optimizer_figure(mnist_compare)
    axes = panels(fig)
    names = [r.optimizer for r in mnist_compare.results]
    assert names == ["adamw", "sf-adamw", "sf-ref", "sf-sgd"]
    assert len(axes) == 4
    for ax, result in zip(axes, mnist_compare.results, strict=True):
        title = ax.title
        assert title.get_text().startswith(result.optimizer + "\n" + result.verdict)
        assert is_red(title) == (result.optimizer == "sf-adamw")
        post, pre = line(ax, POST_LABEL).get_ydata(), line(ax, PRE_LABEL).get_ydata()
        ratios = sorted(a / b for a, b in zip(post, pre, strict=True))
        median = ratios[len(ratios) // 2]
        if result.optimizer == "sf-adamw":
            assert "mutated (adam-normalized)" in title.get_text()
            assert median > 100  # two orders of magnitude between the two lines
            assert ax.collections, "the gap is shaded"
        else:
            assert median == pytest.approx(1.0)
    assert all(ax.get_yscale() == "log" for ax in axes)
    assert len({ax.get_ylim() for ax in axes}) == 1  # one shared y: magnitudes compare


def test_ten_optimizers_of_a_thousand_steps_and_an_error_row():
    random.seed(0)
    results = []
    for i in range(9):
        flagged = i % 3 == 1
        steps = tuple(
            StepRecord(
                k,
                1.0,
                pre := 3 * math.exp(-k / 400) * (1 + random.random()),
                pre * (200 if flagged else 1),
                4,
            )  # fmt: skip
            for k in range(1000)
        )
        results.append(
            OptimizerResult(
                f"opt-{i}",
                "x:Y",
                "mutated" if flagged else "clean",
                3.0,
                3.0,
                200.0 if flagged else 1.0,
                steps=steps,
            )  # fmt: skip
        )
    results.append(
        OptimizerResult("broken", "x:B", "error", error="TypeError: unexpected keyword 'lrr'")
    )
    fig = optimizer_figure(ProbeReport({}, tuple(results), "0", "0"))
    axes = panels(fig)
    assert len(axes) == 10
    assert sum(is_red(ax.title) for ax in axes) == 3 + 1  # the error row is flagged too
    post = line(axes[0], POST_LABEL)
    assert len(post.get_xdata()) == 1000  # the line keeps every step
    assert post.get_markevery() * MARKERS >= 1000  # the markers are thinned
    (why,) = axes[-1].texts
    assert why.get_text().startswith("no curve: TypeError")
    assert not axes[-1].get_lines()
    assert fig.get_figwidth() >= 4 * 4


def test_check_draws_the_baseline_beside(tmp_path):
    from sfdiag.baseline import load_baseline

    config = REPO / "configs" / "import-path.yaml"
    baseline = load_baseline(REPO / "baselines" / "import-path.json")
    report = probe(compare_config(config_path=config))
    fig = optimizer_figure(report, baseline)
    for ax in panels(fig):
        recorded = line(ax, "baseline post-step").get_ydata()
        assert list(recorded) == pytest.approx(list(line(ax, POST_LABEL).get_ydata()), rel=1e-5)
    assert "the baseline" in fig._suptitle.get_text()


@pytest.mark.parametrize("command", ["probe", "compare", "check"])
def test_the_png_is_written_and_never_over_a_file(tmp_path, command):
    args = {
        "probe": ["probe", str(REPO / "configs" / "import-path.yaml")],
        "compare": ["compare", "--steps", "2", "--optimizers", "adamw,sf-adamw"],
        "check": [
            "check",
            str(REPO / "configs" / "import-path.yaml"),
            "--baseline",
            str(REPO / "baselines" / "import-path.json"),
        ],  # fmt: skip
    }[command]
    done = run_cli(*args, "--plot", "p.png", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "p.png").read_bytes().startswith(PNG)
    (tmp_path / "p.png").write_text("mine")
    refused = run_cli(*args, "--plot", "p.png", cwd=tmp_path)
    assert refused.returncode == 2 and "p.png" in refused.stderr and "--force" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert (tmp_path / "p.png").read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]  # no temporary left behind


# ---- sfdiag run: a panel per logged metric --------------------------------------------------
def test_the_logged_tensorboard_curves_over_the_true_norm(tmp_path):
    train = example("train_tensorboard.py")
    with sfdiag.audit(show=False, plot=tmp_path / "run.png") as audit:
        train.main(["--steps", "12", "--logdir", str(tmp_path / "tb")])
    assert (tmp_path / "run.png").read_bytes().startswith(PNG)
    metrics = audit.report.metrics
    assert {m.name: m.verdict for m in metrics} == {
        "train/grad_norm": "correct",
        "train/grad_norm_after_step": "post-step",
    }
    fig = audit.figure()
    axes = panels(fig)
    assert len(axes) == len(metrics) == 2
    for ax, metric in zip(axes, metrics, strict=True):
        assert ax.title.get_text().startswith(f"{metric.name} (tensorboard)\n{metric.verdict}")
        assert is_red(ax.title) == metric.wrong
        logged = line(ax, "logged")
        true = line(ax, "true ‖g‖ (pre-clip / pre-step)")
        post = line(ax, "post-step ‖g‖")
        assert list(logged.get_xdata()) == list(range(12))
        assert list(logged.get_ydata()) == list(metric.series.logged)
        # the right metric lies on the true line, the wrong one on the post-step line
        on = true if metric.verdict == "correct" else post
        assert list(logged.get_ydata()) == pytest.approx(list(on.get_ydata()), rel=1e-3)
        assert ax.get_yscale() == "log"


def test_mode_findings_are_marked_at_their_steps(tmp_path):
    train = example("train_eval_modes.py")
    with sfdiag.audit(show=False) as audit:
        train.main(["--wrong", "--reference", "--out", str(tmp_path / "model.pt")])
    found = {f.kind: f.steps for f in audit.report.findings}
    assert found == {"eval-in-train-mode": (4, 9, 14, 19), "checkpoint-in-train-mode": (19,)}
    fig = audit.figure()  # no logged metric: the optimizer's panel
    (ax,) = panels(fig)
    marks = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
    assert sorted(m.get_xdata()[0] for m in marks) == [4, 9, 14, 19, 19]
    labels = {m.get_label() for m in marks}
    assert {"eval-in-train-mode (an evaluation)", "checkpoint-in-train-mode (a save)"} <= labels
    assert "no logged gradient metric" in fig._suptitle.get_text()


def test_a_jobs_metrics_keep_rank_zeros_series():
    from sfdiag.results import MetricResult
    from sfdiag.run.job import RankSummary, merge

    series = MetricSeries()
    for step in range(5):
        series.add(step, 1.0, 1.0, 2.0)

    def metric(verdict: str, with_series: bool) -> MetricResult:
        return MetricResult("grad_norm", "grad_norm", "tensorboard", "AdamW", 5, verdict, None,
                            1, 1, 1, series=series if with_series else None)  # fmt: skip

    report = ProbeReport({}, (), "0", "0", metrics=())
    summaries = [
        RankSummary(0, 0, "gloo", (), (metric("correct", True),)),
        RankSummary(1, 0, "gloo", (), (metric("local-shard", False),)),  # the worst, no series
    ]
    (merged,) = merge(report, summaries).metrics
    assert merged.verdict == "local-shard" and merged.series is series
    fig = run_figure(merge(report, summaries))
    assert len(panels(fig)) == 1 and is_red(panels(fig)[0].title)


# ---- sfdiag run --plot: checked before the script runs --------------------------------------
SCRIPT = "open('ran', 'w').write('yes')\n"


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("taken", ["--plot", "p.png"], "already exists"),
        (None, ["--plot", "p.json", "--report", "./p.json"], "same file"),
        (None, ["--plot", "missing/p.png"], "missing"),
        ("no-matplotlib", ["--plot", "p.png"], "sfdiag[plot]"),
    ],
)
def test_run_refuses_a_bad_plot_before_the_script_runs(tmp_path, setup, args, message):
    (tmp_path / "train.py").write_text(SCRIPT)
    env = cli_env()
    if setup == "taken":
        (tmp_path / "p.png").write_text("mine")
    if setup == "no-matplotlib":
        blocker = tmp_path / "blocker"
        blocker.mkdir()
        (blocker / "matplotlib.py").write_text("raise ImportError('no matplotlib here')\n")
        env["PYTHONPATH"] = f"{blocker}:{env['PYTHONPATH']}"
    done = run_cli("run", *args, "--", sys.executable, "train.py", cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "ran").exists()
    if setup == "taken":
        assert (tmp_path / "p.png").read_text() == "mine"


def test_run_plot_end_to_end_on_the_tensorboard_example(tmp_path):
    example_script = str(REPO / "examples" / "train_tensorboard.py")
    done = run_cli(
        "run", "--plot", "p.png", "--report", "r.json", "--",
        sys.executable, example_script, "--steps", "6", "--logdir", "tb",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "p.png").read_bytes().startswith(PNG)
    assert "plot written to" in done.stderr
    assert (tmp_path / "r.json").exists()


def test_the_in_process_plot_is_refused_up_front(tmp_path):
    (tmp_path / "p.png").write_text("mine")
    with pytest.raises(SfdiagError, match="already exists"):
        with sfdiag.audit(plot=tmp_path / "p.png"):
            raise AssertionError("never reached: refused before the block")
    assert (tmp_path / "p.png").read_text() == "mine"
