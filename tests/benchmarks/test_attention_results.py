"""The attention benchmark's results file: merging runs (one head_dim per GPU call) and the targets table."""

import argparse

import attention as bench
import results_io


def _row(impl, D, date, fwd, fwdbwd, mem=100.0, L=1024, causal=False):
    return dict(impl=impl, causal=causal, L=L, B=16, H=12, D=D, dtype="bf16", gpu="GPU", date=date, commit="c0",
                fwd_ms=1.0, fwdbwd_ms=3.5, fwd_tflops=fwd, fwdbwd_tflops=fwdbwd, peak_extra_MiB=mem)  # fmt: skip


def _env(date):
    return dict(gpu="GPU", gpus=1, torch="t", cuda="c", triton="tr", transformers=None, python="3", date=date,
                commit="c0")  # fmt: skip


ARGS = argparse.Namespace(tokens=16384, heads=12, out="")


def test_merge_keeps_unmeasured_points_and_replaces_measured_ones(tmp_path):
    args = argparse.Namespace(**{**vars(ARGS), "out": str(tmp_path)})
    first = [_row("fat5", 64, "run1", 100, 100), _row("nobias", 64, "run1", 200, 200),
             _row("fat5", 128, "run1", 100, 100), _row("nobias", 128, "run1", 100, 100)]  # fmt: skip
    bench.save(_env("run1"), args, first)
    earlier = results_io.read_results(tmp_path / "attention.json")["rows"]
    second = [_row("fat5", 128, "run2", 90, 90), _row("nobias", 128, "run2", 100, 100)]
    rows = bench.merge_rows(earlier, second)
    assert {(r["D"], r["impl"], r["date"]) for r in rows} == {
        (64, "fat5", "run1"), (64, "nobias", "run1"), (128, "fat5", "run2"), (128, "nobias", "run2")
    }
    _, markdown_path = bench.save(_env("run2"), args, rows)
    assert results_io.read_results(tmp_path / "attention.json")["rows"] == rows
    markdown = markdown_path.read_text()
    assert "Rows of 2 runs: run1 (GPU, commit c0); run2 (GPU, commit c0)." in markdown
    assert "| fat5 | 64 | 0 | 1024 | 0.50 MISSED | 0.50 MISSED | 1.00 met |" in markdown
    assert "| fat5 | 128 | 0 | 1024 | 0.90 met | 0.90 met | 1.00 met |" in markdown


def test_targets_never_compare_rows_of_different_runs():
    rows = [_row("fat5", 64, "run2", 100, 100), _row("nobias", 64, "run1", 100, 100)]
    assert "| fat5 | 64 | 0 | 1024 |" not in bench.render_markdown(rows)


def test_best_of_runs_sets_times_and_rates():
    row = dict(fwd_ms_runs=[2.0, 1.0, 3.0], fwdbwd_ms_runs=[5.0, 7.0])
    bench.set_best_times(row, B=16, H=12, L=1024, D=64, causal=True)
    assert row["fwd_ms"] == 1.0 and row["fwdbwd_ms"] == 5.0
    flops = 4 * 16 * 12 * 1024 * 1024 * 64 / 2
    assert row["fwd_tflops"] == flops / 1.0 / 1e9
    assert row["fwdbwd_tflops"] == 3.5 * flops / 5.0 / 1e9
    assert row["fwd_ms_runs"] == [2.0, 1.0, 3.0]  # every run stays in the row


def test_best_of_graph_runs_sets_graph_times_and_rates():
    row = dict(fwd_ms_runs=[2.0], fwdbwd_ms_runs=[5.0], fwd_ms_graph_runs=[0.8, 0.5], fwdbwd_ms_graph_runs=[2.5])
    bench.set_best_times(row, B=16, H=12, L=1024, D=64, causal=False)
    assert (row["fwd_ms"], row["fwd_ms_graph"], row["fwdbwd_ms_graph"]) == (2.0, 0.5, 2.5)
    assert row["fwd_tflops_graph"] == 4 * row["fwd_tflops"]


def test_targets_table_shows_eager_and_graph_ratios():
    fat5 = dict(_row("fat5", 64, "run1", 50, 40), fwd_tflops_graph=90, fwdbwd_tflops_graph=170)
    nobias = dict(_row("nobias", 64, "run1", 100, 200), fwd_tflops_graph=100, fwdbwd_tflops_graph=200)
    markdown = bench.render_markdown([fat5, nobias])
    assert "| fwd ratio, graphs | fwd+bwd ratio, graphs | memory ratio (<= 1.1) |" in markdown
    assert "| fat5 | 64 | 0 | 1024 | 0.50 MISSED | 0.20 MISSED | 0.90 met | 0.85 met | 1.00 met |" in markdown


def test_targets_table_has_a_row_per_position_encoding_kernel():
    rows = [_row("fat5", 64, "run1", 90, 90), _row("fat5_alibi", 64, "run1", 95, 85),
            _row("fat5_rope", 64, "run1", 80, 70), _row("nobias", 64, "run1", 100, 100)]  # fmt: skip
    markdown = bench.render_markdown(rows)
    assert "| fat5_alibi | 64 | 0 | 1024 | 0.95 met | 0.85 met | 1.00 met |" in markdown
    assert "| fat5_rope | 64 | 0 | 1024 | 0.80 MISSED | 0.70 MISSED | 1.00 met |" in markdown
