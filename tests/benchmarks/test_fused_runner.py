"""benchmarks/fused.py's run loop on CPU, with the GPU measurements replaced by recorded fakes."""

import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "fused.py")
_spec = importlib.util.spec_from_file_location("fused_benchmark", _PATH)
fused = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fused)


class FakeCase:
    """A self-measuring case whose timings come from a list, one per call."""

    def __init__(self, impl, times, fail_on_call=None):
        self.kernel, self.impl, self.shape, self.mode = "rms_norm", impl, "N=8,d=4", "fwdbwd"
        self.times, self.fail_on_call, self.calls = list(times), fail_on_call, []

    def run(self, check=True):
        self.calls.append(check)
        if len(self.calls) == self.fail_on_call:
            raise RuntimeError("CUDA out of memory")
        return dict(ms=self.times.pop(0), peak_MiB=1.0, **({"rel_err": 1e-3} if check else {}))


def test_ms_is_the_median_of_interleaved_rounds_and_profiling_comes_last(monkeypatch):
    events = []
    fast, slow = FakeCase("fat5", [0.5, 0.1, 0.2]), FakeCase("liger", [0.3, 0.3, 0.9])
    tuple_case = ("rms_norm", "compile", "N=8,d=4", "fwdbwd", None, None)  # timed at 0.4 ms by the fakes below
    real_measure, real_time_again = fused.measure, fused.time_again

    def measure(case, reference_fn):
        events.append(("measure", fused.case_key(case)[1]))
        return dict(ms=0.4, peak_MiB=2.0) if isinstance(case, tuple) else real_measure(case, reference_fn)

    def time_again(case):
        events.append(("time", fused.case_key(case)[1]))
        return 0.4 if isinstance(case, tuple) else real_time_again(case)

    def gpu_time_ms(step, leaves):
        events.append(("profile", None))
        return 0.25

    monkeypatch.setattr(fused, "measure", measure)
    monkeypatch.setattr(fused, "time_again", time_again)
    monkeypatch.setattr(fused, "gpu_time_ms", gpu_time_ms)
    monkeypatch.setattr(fused, "_prepared_step", lambda case: (None, []))
    saved = []

    rows = fused.run_cases([fast, slow, tuple_case], {}, {"device": "test"}, 3, lambda rows: saved.append(len(rows)))

    assert [r["ms"] for r in rows] == [0.2, 0.3, 0.4]
    assert rows[0]["ms_rounds"] == [0.5, 0.1, 0.2] and rows[0]["rel_err"] == 1e-3 and rows[0]["device"] == "test"
    assert fast.calls == [True, False, False]  # checked once, timed alone afterwards
    # each round times every case in turn; the profiler runs after the last round, on tuple cases only
    kinds = [kind for kind, _ in events]
    assert kinds == ["measure"] * 3 + ["time"] * 6 + ["profile"]
    assert [impl for kind, impl in events if kind == "time"] == ["fat5", "liger", "compile"] * 2
    assert rows[2]["gpu_ms"] == 0.25 and "gpu_ms" not in rows[0]
    assert saved == [1, 2, 3, 3, 3, 3]


def test_a_failing_case_is_recorded_and_the_run_goes_on():
    broken, later_failure = FakeCase("fat5", [], fail_on_call=1), FakeCase("liger", [0.3, 0.2], fail_on_call=3)

    rows = fused.run_cases([broken, later_failure], {}, {}, 3, lambda rows: None)

    assert rows[0]["error"].startswith("RuntimeError: CUDA out of memory") and len(broken.calls) == 1
    assert rows[1]["ms_rounds"] == [0.3, 0.2] and rows[1]["ms"] == pytest.approx(0.25)
    assert rows[1]["round_error"].startswith("RuntimeError")


def test_rounds_must_be_positive():
    with pytest.raises(SystemExit):
        fused.main(["--rounds", "0", "--markdown-only"])


def _flce_row(impl, shape, ms, **extra):
    return dict(kernel="flce", impl=impl, shape=shape, mode="fwdbwd", ms=ms, peak_MiB=1.0, **extra)


def test_flce_against_its_matmuls_is_judged_on_the_paired_ratio_where_measured():
    paired = dict(paired_fat5_ms=12.0, paired_matmuls_ms=10.0, paired_ratio=1.2)
    rows = [
        _flce_row("fat5", "V=big", 13.0),  # 1.3x by the sequential rows, 1.2x paired: met
        _flce_row("matmuls", "V=big", 10.0, **paired),
        _flce_row("fat5", "V=small", 1.3),  # no paired measurement: the rows decide
        _flce_row("matmuls", "V=small", 1.0),
        _flce_row("fat5", "V=failed", 1.0),
        dict(kernel="flce", impl="matmuls", shape="V=failed", mode="fwdbwd", error="CUDA out of memory"),
        dict(_flce_row("fat5", "V=big", 13.0), mode="fwd"),
    ]
    verdicts = {v["shape"]: v for v in fused.matmul_ratios(rows)}
    assert set(verdicts) == {"V=big", "V=small"}
    assert verdicts["V=big"]["ratio"] == pytest.approx(1.3) and verdicts["V=big"]["paired_ratio"] == 1.2
    assert verdicts["V=big"]["met"] and not verdicts["V=small"]["met"]
    table = fused.markdown(rows).split("## Fused linear + cross-entropy against its three matmuls")[1]
    assert "| V=big | 13.000 | 10.000 | 1.300 | 12.000 | 10.000 | 1.200 | met |" in table
    assert "| V=small | 1.300 | 1.000 | 1.300 |" in table and "**not met**" in table


def test_markdown_only_rewrites_the_markdown_from_the_results_file(tmp_path):
    import results_io

    env = dict(gpu="GPU", gpus=1, torch="t", cuda="c", triton="tr", transformers=None, python="3", date="d",
               commit="c0", liger_kernel="0.8")  # fmt: skip
    run = dict(gpu="GPU", torch="t", triton="tr", liger_kernel="0.8", date="d", commit="c0")
    rows = [dict(_flce_row("fat5", "V=big", 13.0), **run), dict(_flce_row("matmuls", "V=big", 10.0), **run)]
    fused.save(env, {"kernels": "flce"}, rows, str(tmp_path))
    (tmp_path / "fused.md").unlink()
    fused.main(["--markdown-only", "--output-dir", str(tmp_path)])
    markdown = (tmp_path / "fused.md").read_text()
    assert "- flce: GPU, torch t, triton tr, liger-kernel 0.8, d, commit c0" in markdown
    assert "| V=big | 13.000 | 10.000 | 1.300 |" in markdown
    assert results_io.read_results(tmp_path / "fused.json")["rows"] == rows
