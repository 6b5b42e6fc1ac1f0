"""Opt-in: run transformers' own T5 model tests against FAT5, with only the class names changed.

FAT5 claims to be a drop-in for transformers' T5 (same module layout, parameter names, forward
signatures). This file checks the claim with transformers' own test module
`tests/models/t5/test_modeling_t5.py`, which is not shipped in transformers' wheel or sdist, so it needs
a transformers checkout:

    FAT5_TRANSFORMERS_TESTS=/path/to/transformers pytest tests/fat5_hf/test_transformers_t5_suite.py

(the folder that contains `tests/models/t5/test_modeling_t5.py`; check out the tag that matches the
installed transformers, and install transformers' test extras, at least `parameterized`). Without the
variable the suite run is skipped; the import rewriter it relies on is always tested.

How the swap works, and why this way: a temporary folder mirrors the checkout with symlinks (nothing
is written into the checkout) and holds two copies of the T5 test module side by side:

- `test_modeling_t5.py`, the original, run against transformers' T5 as the baseline;
- `test_modeling_t5_as_fat5.py`, where each `from transformers import T5Model, ...` (also from
  `transformers.models.t5[.modeling_t5|.configuration_t5]`) is rewritten to
  `from fat5_hf import FAT5Model as T5Model`. Nothing else in the module changes.

Rewriting the import lines is simpler and sturdier than rebinding attributes of `transformers`: the
common test files call `direct_transformers_import`, which re-executes `transformers/__init__.py` and
replaces `sys.modules["transformers"]` halfway through the collection, so names rebound on the first
module object would silently revert to T5.

Both copies run in one pytest subprocess (offline, `HF_HUB_OFFLINE=1`). A test of the FAT5 copy that
fails while the same test of the T5 copy passes is a divergence of FAT5 from T5. The assertion is that
those divergences are exactly `EXPECTED_FAT5_FAILURES`, each argued below. A plugin turns an entry into an
xfail only when the failure matches it (error text and, where given, the model class under test), and turns
a pass into a failure (stale entry). Likewise a test FAT5 skips where T5 runs must be in
`EXPECTED_FAT5_SKIPS`. The plugin also gives the FAT5 classes the T5 rows of transformers' auto name tables,
which the common tests use to tell a class's role. Tests that also fail for T5 itself (a test module newer or
older than the installed transformers) say nothing about FAT5; they are listed in the failure message and
in `transformers_t5_suite.md`.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from xml.etree import ElementTree

import pytest

ENV_VAR = "FAT5_TRANSFORMERS_TESTS"
T5_TEST_MODULE = Path("tests/models/t5/test_modeling_t5.py")
FAT5_TEST_MODULE_NAME = "test_modeling_t5_as_fat5.py"

# The only change made to transformers' T5 test module: these names come from fat5_hf.
T5_TO_FAT5_NAMES = {
    "T5Config": "FAT5Config",
    "T5Model": "FAT5Model",
    "T5ForConditionalGeneration": "FAT5ForConditionalGeneration",
    "T5EncoderModel": "FAT5EncoderModel",
    "T5ForSequenceClassification": "FAT5ForSequenceClassification",
    "T5ForTokenClassification": "FAT5ForTokenClassification",
    "T5ForQuestionAnswering": "FAT5ForQuestionAnswering",
    "T5PreTrainedModel": "FAT5PreTrainedModel",
}
T5_IMPORT_MODULES = {
    "transformers",
    "transformers.models.t5",
    "transformers.models.t5.modeling_t5",
    "transformers.models.t5.configuration_t5",
}

# `Class::test` of the FAT5 copy -> why FAT5 is expected to fail it where T5 passes. Keep each reason
# specific: a deliberate design difference, never "FAT5 is different".
_ENCODER_ONLY_HEADS = (
    "FAT5's sequence-classification and QA heads are encoder-only by design (mean-pooled encoder states for "
    "classification, spans from encoder states for QA; see their docstrings), where T5's run the decoder too: they "
    "return SequenceClassifierOutput/QuestionAnsweringModelOutput with `attentions`/`hidden_states`, not the "
    "encoder_*/decoder_* fields this test reads. The failure must come from that head: FAT5Model and "
    "FAT5ForConditionalGeneration, earlier in the same loop, passed."
)
_LOSS_OUTPUTS = (
    "With labels, FAT5ForConditionalGeneration returns FAT5Seq2SeqLMOutput = Seq2SeqLMOutput + `ce_loss` and `z_loss` "
    "(the two parts of the loss; tested in test_modeling.py) and, like Bart, builds no KV cache unless `use_cache=True` "
    "is passed (so the decoder can take the attention kernel in training): 5 non-None fields (loss, logits, "
    "encoder_last_hidden_state, ce_loss, z_loss) where T5 has 4 (loss, logits, past_key_values, "
    "encoder_last_hidden_state). The test counts the fields."
)

# `Class::test` of the FAT5 copy -> why FAT5 fails it where T5 passes, and how the failure must look: `error`, a
# regex searched in "ExceptionType: message", and optionally `model_class`, the class the test was looping over
# (its `model_class` local). A failure that does not match stays a failure. Each reason is a deliberate design
# difference, never "FAT5 is different".
EXPECTED_FAT5_FAILURES: dict[str, dict[str, str]] = {
    "T5ModelTest::test_attention_outputs": {
        "reason": _ENCODER_ONLY_HEADS,
        "error": r"^AssertionError: 2 != 5$",
        "model_class": "FAT5ForSequenceClassification",
    },
    "T5ModelTest::test_hidden_states_output": {
        "reason": _ENCODER_ONLY_HEADS,
        "error": r"^AttributeError: 'SequenceClassifierOutput' object has no attribute 'encoder_hidden_states'$",
        "model_class": "FAT5ForSequenceClassification",
    },
    "T5ModelTest::test_with_lm_head": {"reason": _LOSS_OUTPUTS, "error": r"^AssertionError: 5 != 4$"},
    "TestAsymmetricT5::test_small_decoder": {
        "reason": _LOSS_OUTPUTS,
        "error": r"^AssertionError: assert 5 == 4\n.*FAT5Seq2SeqLMOutput",
    },
    "TestAsymmetricT5::test_defaulting_to_symmetry": {
        "reason": _LOSS_OUTPUTS,
        "error": r"^AssertionError: assert 5 == 4\n.*FAT5Seq2SeqLMOutput",
    },
}

# `Class::test` that FAT5 skips where T5 runs it -> why. None since FAT5 keeps T5's fp16 guard
# (`_keep_in_fp32_modules = ["wo"]`), which made the two `test_keep_in_fp32_modules*` tests run and pass.
EXPECTED_FAT5_SKIPS: dict[str, str] = {}

SUBPROCESS_TIMEOUT_S = 1800


def swap_t5_imports(source: str) -> tuple[str, list[str]]:
    """Rewrite the T5 model/config imports of a test module into aliased imports from `fat5_hf`.

    `from transformers import T5Config, T5Tokenizer` becomes `from transformers import T5Tokenizer` followed
    by `from fat5_hf import FAT5Config as T5Config`, at the same indentation; every other line is kept
    byte for byte.

    Args:
        source: Python source of the test module.

    Returns:
        The rewritten source and the sorted T5 names that were swapped.
    """
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    replacements: list[tuple[int, int, str]] = []  # (first line index, end line index, new text)
    swapped: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or node.level != 0 or node.module not in T5_IMPORT_MODULES:
            continue
        to_swap = [alias for alias in node.names if alias.name in T5_TO_FAT5_NAMES]
        if not to_swap:
            continue
        kept = [alias for alias in node.names if alias.name not in T5_TO_FAT5_NAMES]
        indent = re.match(r"[ \t]*", lines[node.lineno - 1]).group(0)
        statements = []
        if kept:
            statements.append(ast.unparse(ast.ImportFrom(module=node.module, names=kept, level=0)))
        fat5_aliases = [
            ast.alias(name=T5_TO_FAT5_NAMES[alias.name], asname=alias.asname or alias.name) for alias in to_swap
        ]
        statements.append(ast.unparse(ast.ImportFrom(module="fat5_hf", names=fat5_aliases, level=0)))
        replacements.append((node.lineno - 1, node.end_lineno, "".join(f"{indent}{s}\n" for s in statements)))
        swapped.update(alias.name for alias in to_swap)
    for start, end, text in sorted(replacements, reverse=True):
        lines[start:end] = [text]
    rewritten = "".join(lines)
    # A T5 class reached some other way (`transformers.T5Model`, `getattr(transformers, ...)`) would keep
    # testing T5 under the FAT5 name: refuse rather than report a misleading pass.
    leftover = [
        name for name in T5_TO_FAT5_NAMES if re.search(rf"transformers(?:\.\w+)*\.{name}\b", rewritten)
    ]
    if leftover:
        raise ValueError(f"{', '.join(leftover)} reached through an attribute of transformers; extend swap_t5_imports")
    return rewritten, sorted(swapped)


def stage_suite(checkout: Path, workdir: Path) -> Path:
    """Mirror `checkout` under `workdir` with symlinks and add the FAT5 copy of the T5 test module.

    Returns:
        The path of the FAT5 copy.
    """
    for entry in checkout.iterdir():
        if entry.name != "tests":
            (workdir / entry.name).symlink_to(entry)
    tests = workdir / "tests"
    tests.mkdir()
    for entry in (checkout / "tests").iterdir():
        if entry.name != "models":
            (tests / entry.name).symlink_to(entry)
    t5_dir = tests / "models" / "t5"
    t5_dir.mkdir(parents=True)
    (tests / "models" / "__init__.py").symlink_to(checkout / "tests" / "models" / "__init__.py")
    for entry in (checkout / T5_TEST_MODULE.parent).iterdir():
        if entry.suffix == ".py":
            (t5_dir / entry.name).symlink_to(entry)
    rewritten, swapped = swap_t5_imports((checkout / T5_TEST_MODULE).read_text())
    if "T5Config" not in swapped or "T5Model" not in swapped:
        raise ValueError(f"{checkout / T5_TEST_MODULE} imports no T5Config/T5Model from transformers; layout changed?")
    fat5_module = t5_dir / FAT5_TEST_MODULE_NAME
    fat5_module.write_text(rewritten)
    return fat5_module


_PLUGIN = textwrap.dedent(
    r'''
    """Loaded into the suite's pytest run by test_transformers_t5_suite.py (fat5-hf)."""
    import json
    import os
    import re

    import pytest

    SETTINGS = json.loads(os.environ["FAT5_SUITE_SETTINGS"])


    def pytest_sessionstart(session):
        # `ModelTesterMixin` decides what a class is by looking its *name* up in transformers' auto tables
        # (`_prepare_for_class` adds labels only for names in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        # `test_training` skips the base models of MODEL_MAPPING_NAMES, ...). Give each FAT5 class the row of
        # the T5 class it replaces, as an in-library model would have; CONFIG_MAPPING_NAMES stays untouched
        # (fat5_hf registers its config with AutoConfig itself).
        from transformers.models.auto import modeling_auto

        for table_name in dir(modeling_auto):
            table = getattr(modeling_auto, table_name)
            if table_name.endswith("_MAPPING_NAMES") and isinstance(table, dict):
                if table.get("t5") in SETTINGS["names"]:
                    table.setdefault("fat5", SETTINGS["names"][table["t5"]])


    def _expected(item):
        if item.path.name != SETTINGS["fat5_module"]:
            return None
        return SETTINGS["expected"].get(item.nodeid.split("::", 1)[1].split("[", 1)[0])


    def _looped_model_class(excinfo):
        # the `model_class` the common tests loop over, read in the innermost frame that has one
        for entry in reversed(excinfo.traceback):
            model_class = entry.frame.f_locals.get("model_class")
            if isinstance(model_class, type):
                return model_class.__name__
        return None


    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(item, call):
        # An expected failure becomes an xfail only if it fails the way its entry says; a pass is a strict XPASS.
        report = yield
        spec = _expected(item)
        if spec is None or call.when != "call":
            return report
        if report.failed and call.excinfo is not None:
            error = f"{call.excinfo.typename}: {call.excinfo.value}"
            model_class = _looped_model_class(call.excinfo)
            if re.search(spec["error"], error, re.S) and spec.get("model_class") in (None, model_class):
                report.outcome = "skipped"
                report.wasxfail = spec["reason"]
            else:
                report.longrepr = (
                    f"{report.longrepr}\n\n[fat5-hf] not the expected failure: wanted {spec['error']!r}"
                    f" in {spec.get('model_class')}, got {error!r} in {model_class}"
                )
        elif report.passed:
            report.outcome = "failed"
            report.longrepr = f"[XPASS(strict)] expected FAT5 failure passed: {spec['reason']}"
        return report
    '''
)

def parse_junit_outcomes(junit_xml: str) -> dict[str, dict[str, str]]:
    """`{module file name: {"Class::test": outcome}}` from pytest's JUnit XML.

    The outcome is "passed", "failed" (a failure or an error, in any phase or subtest), "xfailed", or
    "skipped: <reason>". Parametrized cases of one test share its key; the worst outcome wins.
    """
    rank = {"passed": 0, "skipped": 1, "xfailed": 2, "failed": 3}
    outcomes: dict[str, dict[str, str]] = {}
    for case in ElementTree.fromstring(junit_xml).iter("testcase"):
        module, _, test_class = case.get("classname", "").rpartition(".")
        if not module:
            continue  # pytest's own "internal error" entries carry no test module
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped" and outcome == "passed":
                is_xfail = child.get("type") == "pytest.xfail"
                outcome = "xfailed" if is_xfail else f"skipped: {child.get('message', '')}"
        key = f"{test_class}::{case.get('name', '').split('[', 1)[0]}"
        per_module = outcomes.setdefault(f"{module.rpartition('.')[2]}.py", {})
        previous = per_module.get(key)
        if previous is None or rank[outcome.split(":")[0]] > rank[previous.split(":")[0]]:
            per_module[key] = outcome
    return outcomes


def test_swap_t5_imports_rewrites_only_t5_model_names():
    source = textwrap.dedent(
        """\
        from transformers import T5Config, is_torch_available  # config
        from transformers.testing_utils import slow

        if is_torch_available():
            from transformers import (
                AutoTokenizer,
                T5EncoderModel,
                T5Model as Base,
            )
            from transformers.models.t5.modeling_t5 import T5PreTrainedModel
        x = T5Config  # untouched use
        """
    )
    rewritten, swapped = swap_t5_imports(source)
    assert swapped == ["T5Config", "T5EncoderModel", "T5Model", "T5PreTrainedModel"]
    assert rewritten == textwrap.dedent(
        """\
        from transformers import is_torch_available
        from fat5_hf import FAT5Config as T5Config
        from transformers.testing_utils import slow

        if is_torch_available():
            from transformers import AutoTokenizer
            from fat5_hf import FAT5EncoderModel as T5EncoderModel, FAT5Model as Base
            from fat5_hf import FAT5PreTrainedModel as T5PreTrainedModel
        x = T5Config  # untouched use
        """
    )
    namespace: dict = {}
    exec(compile(rewritten, "<rewritten>", "exec"), namespace)
    import fat5_hf

    assert namespace["T5Config"] is fat5_hf.FAT5Config and namespace["Base"] is fat5_hf.FAT5Model


def test_swap_t5_imports_refuses_attribute_access():
    with pytest.raises(ValueError, match="T5Model reached through an attribute"):
        swap_t5_imports("import transformers\nfrom transformers import T5Config\nm = transformers.T5Model\n")


def test_parse_junit_outcomes():
    junit = textwrap.dedent(
        """\
        <testsuites><testsuite>
          <testcase classname="tests.models.t5.test_modeling_t5.T5ModelTest" name="test_model"><failure message="x"/></testcase>
          <testcase classname="tests.models.t5.test_modeling_t5_as_fat5.T5ModelTest" name="test_model"/>
          <testcase classname="tests.models.t5.test_modeling_t5_as_fat5.T5ModelTest" name="test_x">
            <skipped type="pytest.xfail" message="why"/></testcase>
          <testcase classname="tests.models.t5.test_modeling_t5_as_fat5.T5ModelTest" name="test_p_0_a">
            <skipped type="pytest.skip" message="no GPU"/></testcase>
          <testcase classname="tests.models.t5.test_modeling_t5_as_fat5.T5ModelTest" name="test_e"><error message="e"/></testcase>
          <testcase classname="pytest" name="internal"><error message="internal error"/></testcase>
        </testsuite></testsuites>
        """
    )
    assert parse_junit_outcomes(junit) == {
        "test_modeling_t5.py": {"T5ModelTest::test_model": "failed"},
        "test_modeling_t5_as_fat5.py": {
            "T5ModelTest::test_model": "passed",
            "T5ModelTest::test_x": "xfailed",
            "T5ModelTest::test_p_0_a": "skipped: no GPU",
            "T5ModelTest::test_e": "failed",
        },
    }


@pytest.mark.parametrize("model_name", ["FAT5Model", "FAT5ForConditionalGeneration"])
def test_encoder_attentions_match_t5_without_hidden_states(model_name):
    # Regression for what the T5 suite found (test_attention_outputs): with `output_attentions=True` alone, the
    # encoder attentions were filed as `encoder_hidden_states` and `encoder_attentions` came back empty.
    import torch
    import transformers

    import fat5_hf

    kwargs = dict(vocab_size=99, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4, decoder_start_token_id=0)
    input_ids = torch.randint(2, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    outputs = {}
    for config_class, model_class in [
        (transformers.T5Config, getattr(transformers, model_name.removeprefix("FA"))),
        (fat5_hf.FAT5Config, getattr(fat5_hf, model_name)),
    ]:
        model = model_class._from_config(config_class(**kwargs), attn_implementation="eager").eval()
        with torch.no_grad():
            outputs[model_class] = model(input_ids=input_ids, decoder_input_ids=input_ids, output_attentions=True)
    t5_out, fat5_out = outputs.values()
    assert fat5_out.encoder_hidden_states is None and t5_out.encoder_hidden_states is None
    assert len(fat5_out.encoder_attentions) == len(t5_out.encoder_attentions) == 2
    assert fat5_out.encoder_attentions[0].shape == t5_out.encoder_attentions[0].shape == (2, 4, 7, 7)


def test_forward_kwargs_are_typed_like_t5():
    # transformers reads `**kwargs: Unpack[TransformersKwargs]` to know a model takes `output_attentions`
    # (e.g. the common test_eager_matches_sdpa_inference skipped FAT5's output_attentions cases without it).
    import inspect

    import fat5_hf

    for model_class in (
        fat5_hf.FAT5Model,
        fat5_hf.FAT5ForConditionalGeneration,
        fat5_hf.FAT5EncoderModel,
        fat5_hf.FAT5ForSequenceClassification,
        fat5_hf.FAT5ForTokenClassification,
        fat5_hf.FAT5ForQuestionAnswering,
    ):
        annotation = inspect.signature(model_class.forward).parameters["kwargs"].annotation
        assert "output_attentions" in annotation.__args__[0].__annotations__, model_class.__name__


@pytest.mark.slow
def test_transformers_t5_suite_runs_against_fat5(tmp_path):
    checkout = os.environ.get(ENV_VAR)
    if not checkout:
        pytest.skip(
            f"set {ENV_VAR} to a transformers checkout (the folder holding {T5_TEST_MODULE}) to run transformers' "
            "T5 tests against FAT5; transformers ships no tests in its wheel or sdist"
        )
    checkout_path = Path(checkout).expanduser().resolve()
    if not (checkout_path / T5_TEST_MODULE).is_file():
        pytest.fail(f"{ENV_VAR}={checkout}: no {T5_TEST_MODULE} there; point it at the root of a transformers checkout")
    pytest.importorskip("parameterized", reason="transformers' common tests need `parameterized` (pip install it)")

    workdir = tmp_path / "suite"
    workdir.mkdir()
    stage_suite(checkout_path, workdir)
    (tmp_path / "fat5_expected_failures.py").write_text(_PLUGIN)

    env = dict(os.environ)
    env.pop("PYTEST_XDIST_WORKER", None)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        FAT5_SUITE_SETTINGS=json.dumps(
            {"expected": EXPECTED_FAT5_FAILURES, "names": T5_TO_FAT5_NAMES, "fat5_module": FAT5_TEST_MODULE_NAME}
        ),
        PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")])),
    )
    junit_path = tmp_path / "suite.xml"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "fat5_expected_failures",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rfExX",
        f"--junitxml={junit_path}",
        "-o",
        "log_cli=false",
        "-W",
        "ignore",
        f"tests/models/t5/{T5_TEST_MODULE.name}",
        f"tests/models/t5/{FAT5_TEST_MODULE_NAME}",
    ]
    workers = os.environ.get("FAT5_TRANSFORMERS_TESTS_WORKERS")
    if workers:
        command += ["-n", workers]
    result = subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S
    )
    output = result.stdout + result.stderr
    log_path = os.environ.get("FAT5_TRANSFORMERS_TESTS_LOG")
    if log_path:  # the whole run, for the report (transformers_t5_suite.md)
        Path(log_path).write_text(f"$ (cd {workdir} && {' '.join(command)})\n{output}")
    tail = "\n".join(output.splitlines()[-60:])
    if result.returncode not in (0, 1):  # 1 = some tests failed; anything else = the run itself broke
        pytest.fail(f"pytest exited {result.returncode} (collection or usage error):\n{tail}")

    if not junit_path.is_file():
        pytest.fail(f"pytest wrote no JUnit report:\n{tail}")
    outcomes = parse_junit_outcomes(junit_path.read_text())
    t5 = outcomes.get(T5_TEST_MODULE.name, {})
    fat5 = outcomes.get(FAT5_TEST_MODULE_NAME, {})
    if not t5 or not fat5:
        pytest.fail(f"one of the two modules ran no test (T5: {len(t5)}, FAT5: {len(fat5)}):\n{tail}")
    failures = {test for test, outcome in fat5.items() if outcome == "failed"}
    # failing for T5 too says nothing about FAT5 (the test module is older or newer than the installed transformers)
    t5_failures = {test for test, outcome in t5.items() if outcome == "failed"}
    unexpected = sorted(failures - t5_failures - EXPECTED_FAT5_FAILURES.keys())
    stale = sorted(failures & EXPECTED_FAT5_FAILURES.keys())  # passed (strict XPASS) or failed another way
    missing_xfails = sorted(
        test for test in EXPECTED_FAT5_FAILURES if test in fat5 and fat5[test] not in ("xfailed", "failed")
    )
    # a test skipped for FAT5 where it ran for T5 is a hole in the comparison: each needs a reason
    new_skips = {
        test for test, outcome in fat5.items() if outcome.startswith("skipped") and t5.get(test) == "passed"
    }
    unexpected_skips = sorted(new_skips - EXPECTED_FAT5_SKIPS.keys())
    stale_skips = sorted(test for test in EXPECTED_FAT5_SKIPS if test in fat5 and test not in new_skips)
    problems = []
    for title, tests in [
        ("FAT5 fails where T5 passes (fix FAT5, or argue it in EXPECTED_FAT5_FAILURES):", unexpected),
        ("expected failures that passed or failed another way (see the tail):", stale + missing_xfails),
        ("FAT5 skips where T5 runs (argue it in EXPECTED_FAT5_SKIPS):", unexpected_skips),
        ("expected skips that no longer happen (remove them from EXPECTED_FAT5_SKIPS):", stale_skips),
    ]:
        if tests:
            problems.append(title)
            problems += [f"  {test}: {fat5.get(test)}" for test in tests]
    if problems:
        baseline = ", ".join(sorted(t5_failures)) or "none"
        pytest.fail("\n".join(problems) + f"\n(T5 itself fails: {baseline})\n--- pytest tail ---\n{tail}")
