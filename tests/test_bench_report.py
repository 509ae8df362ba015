"""fastvae.benchmarks.report: the plot of a run (also of one op alone, or of training steps alone)
and the order of the table's rows."""

import warnings

import pytest

from fastvae.benchmarks.measure import Row
from fastvae.benchmarks.report import format_table, plot, row_order, speedup_figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install fastvae[plot])")


def _steps(batch: int = 16) -> list[Row]:
    return [Row("train_step", method, "step", f"batch {batch} 64x64", batch, median, None)
            for method, median in (("eager", 0.2), ("fused", 0.1), ("compile", 0.15))]


def _loss(method: str, batch: int, median: float, pass_: str = "fwd+bwd") -> Row:
    return Row("vae_loss", method, pass_, f"{batch}x3x64x64", batch * 3 * 64 * 64, median, 3 * batch * 3 * 64 * 64 * 4)


def _write_without_warnings(tmp_path, rows: list[Row]):
    path = tmp_path / "run.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot(str(path), rows, "a run")
    assert path.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize(
    "rows",
    [
        pytest.param(_steps(), id="training-steps-alone"),
        # What `pytest bench/bench_vae_loss.py --benchmark -k eager` writes: nothing to compare.
        pytest.param([_loss("eager", 16, 2e-3), _loss("eager", 128, 1e-2)], id="one-op-eager-alone"),
        pytest.param([], id="no-rows"),
    ],
)
def test_a_run_with_no_speedup_to_draw_is_plotted_without_a_warning_or_legend(tmp_path, rows):
    _write_without_warnings(tmp_path, rows)
    ax = speedup_figure(rows, "a run").axes[0]
    assert ax.get_legend() is None
    assert [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")] == []
    assert any("no forward + backward" in text.get_text() for text in ax.texts)


def test_each_op_and_method_is_a_labelled_series_of_speedups_over_eager(tmp_path):
    rows = [
        _loss("eager", 16, 4e-3), _loss("fused", 16, 1e-3), _loss("compile", 16, 2e-3),
        _loss("eager", 128, 3e-2), _loss("fused", 128, 1e-2),
        # Neither a forward alone nor the floor nor a training step is drawn.
        _loss("fused", 16, 1e-4, pass_="fwd"), _loss("floor", 16, 1e-4, pass_="fwd"), *_steps(),
    ]
    _write_without_warnings(tmp_path, rows)
    ax = speedup_figure(rows, "a run").axes[0]
    legend = ax.get_legend()
    assert legend is not None
    assert [text.get_text() for text in legend.get_texts()] == ["vae_loss compile", "vae_loss fused"]
    series = {line.get_label(): line.get_xydata().tolist() for line in ax.get_lines()
              if not line.get_label().startswith("_")}
    n = 3 * 64 * 64
    assert series == {"vae_loss compile": [[16 * n, 2.0]], "vae_loss fused": [[16 * n, 4.0], [128 * n, 3.0]]}
    assert len(ax.texts) == 0


def test_a_method_the_order_does_not_name_sorts_after_those_it_does():
    # A training-step method added to fastvae.benchmarks.train_step needs no other change.
    rows = [*_steps(), Row("train_step", "fused+graphed", "step", "batch 16 64x64", 16, 0.05, None)]
    ordered = sorted(rows, key=row_order)
    assert [r.method for r in ordered] == ["eager", "compile", "fused", "fused+graphed"]
    table = format_table(ordered, None)
    assert "batch 16 64x64     fused+graphed    " in table
    assert table.splitlines()[-1].split()[4:8] == ["50.00", "ms", "320", "4.00x"]
