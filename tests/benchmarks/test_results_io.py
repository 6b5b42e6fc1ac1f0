"""The shared results writer: the one JSON shape, the markdown table and environment line, bad input refused, and
every committed result file in that shape."""

import json
from pathlib import Path

import pytest
import results_io

RESULTS = Path(results_io.__file__).parent / "results"
ALL_SCRIPTS = sorted(p.stem for p in RESULTS.parent.glob("*.py") if p.stem not in ("results_io", "fused_cross_entropy_cases"))
# Benchmarks written but not yet run on a GPU: they have no result yet (benchmarks/README.md says so); each leaves
# this set with its first committed run.
AWAITING_FIRST_RUN = {"finetune_lora", "finetune_step", "length_generalization"}
SCRIPTS = [script for script in ALL_SCRIPTS if script not in AWAITING_FIRST_RUN]


def _env(**overrides):
    env = dict(gpu="NVIDIA H100 80GB HBM3", gpus=1, torch="2.13.0", cuda="13.0", triton="3.9.0",
               transformers="5.24.0", python="3.12.3", date="2026-12-01T10:00:00+00:00", commit="abc1234")  # fmt: skip
    return {**env, **overrides}


def test_environment_has_every_key_on_this_machine():
    env = results_io.environment(liger_kernel=None)
    assert list(env)[: len(results_io.ENVIRONMENT_KEYS)] == list(results_io.ENVIRONMENT_KEYS)
    assert env["torch"] and env["python"] and env["date"].endswith("+00:00") and "liger_kernel" in env
    assert env["commit"] is None or len(env["commit"]) >= 7  # a checkout has one; a copy of the files may not


def test_write_results_writes_the_one_shape_and_a_table(tmp_path):
    rows = [dict(variant="fat5", ms=1.23456, runs=[1.2, 1.3]), dict(variant="t5", ms=2.5, note="a | b")]
    json_path, md_path = results_io.write_results(
        "demo", rows, env=_env(liger_kernel="0.6"), args={"steps": 5, "out": tmp_path}, title="Demo",
        method="How it was measured.", output_dir=tmp_path,
    )  # fmt: skip
    saved = results_io.read_results(json_path)
    assert list(saved) == ["environment", "args", "rows"] and saved["rows"] == rows
    assert saved["args"] == {"steps": 5, "out": str(tmp_path)}  # paths recorded as strings
    lines = md_path.read_text().splitlines()
    assert lines[0] == "# Demo"
    assert lines[2] == ("NVIDIA H100 80GB HBM3, torch 2.13.0, CUDA 13.0, triton 3.9.0, transformers 5.24.0, "
                        "Python 3.12.3, liger-kernel 0.6, 2026-12-01T10:00:00+00:00, commit abc1234. "
                        "Written by `benchmarks/demo.py`.")  # fmt: skip
    assert lines[4] == "How it was measured."
    # scalar fields only (lists stay in the JSON); the cell separator escaped
    assert lines[6:] == ["| variant | ms | note |", "|---|---|---|", "| fat5 | 1.23456 |  |", "| t5 | 2.5 | a / b |"]
    assert not list(tmp_path.glob("*.partial"))


def test_columns_format_numbers_and_compute_cells():
    columns = [results_io.Column("tokens/s", "tokens", ","), results_io.Column("x", lambda r: f"{r['tokens'] / 2:.1f}x"),
               results_io.Column("missing", "nope", ".2f"), results_io.Column("ok", "ok", ".2f")]  # fmt: skip
    table = results_io.markdown_table([dict(tokens=881600, ok=True)], columns)
    assert table.splitlines()[-1] == "| 881,600 | 440800.0x |  | True |"


@pytest.mark.parametrize(
    "script, env, error",
    [
        ("results/attention", _env(), "bare name"),
        ("attention.json", _env(), "bare name"),
        ("attention", {k: v for k, v in _env().items() if k != "commit"}, r"lacks \['commit'\]"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_written(tmp_path, script, env, error):
    with pytest.raises(ValueError, match=error):
        results_io.write_results(script, [dict(a=1)], env=env, title="t", output_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_read_results_names_what_an_old_shape_lacks(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"meta": {}, "rows": []}))
    with pytest.raises(ValueError, match=r"old.json is not a benchmark result.*'environment', 'args'"):
        results_io.read_results(old)


def test_results_folder_holds_one_current_result_per_script_in_the_one_shape():
    names = {p.name for p in RESULTS.iterdir()}
    expected = {f"{script}{suffix}" for script in SCRIPTS for suffix in (".json", ".md")}
    assert expected <= names, sorted(expected - names)
    notes = {name for name in names if name.endswith(".notes.md")}
    assert {name.removesuffix(".notes.md") for name in notes} <= set(SCRIPTS)
    assert names == expected | notes, sorted(names - expected - notes)  # nothing else: older runs live in git
    assert AWAITING_FIRST_RUN <= set(ALL_SCRIPTS), sorted(AWAITING_FIRST_RUN - set(ALL_SCRIPTS))
    for script in SCRIPTS:
        result = results_io.read_results(RESULTS / f"{script}.json")
        assert result["rows"] and all(result["environment"][key] for key in ("gpu", "date", "commit")), script


def test_commit_outside_a_checkout_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FAT5_COMMIT", "1234abc")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # git must not find the checkout above tmp_path
    assert results_io.git_commit(tmp_path) == "1234abc"
    monkeypatch.delenv("FAT5_COMMIT")
    assert results_io.git_commit(tmp_path) is None
