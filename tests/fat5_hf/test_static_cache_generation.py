"""`generate()` with a static cache and the compiled decoding step (transformers' `cache_implementation="static"` and
`CompileConfig`): one graph for every step, and the tokens of the uncompiled dynamic-cache path and of HF T5 on the
same weights (greedy, fp32). On CPU the compile uses dynamo's "eager" backend (the graph capture, not the codegen)
and is forced with `_compile_all_devices`, which transformers sets for devices other than CUDA."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters
from transformers.generation import CompileConfig

from fat5_hf import apply_fat5_kernels, kernel_ops


def _compile_config() -> CompileConfig:
    config = CompileConfig(backend="eager", fullgraph=True, mode=None)
    config._compile_all_devices = True
    return config


def _generate(model, batch, new_tokens: int, **kwargs):
    return model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)


def _compiled_graphs_and_tokens(model, batch, new_tokens: int):
    torch._dynamo.reset()
    counters.clear()
    tokens = _generate(model, batch, new_tokens, cache_implementation="static", compile_config=_compile_config())
    return counters["stats"]["unique_graphs"], tokens


@pytest.mark.slow
def test_static_compiled_generation_matches_dynamic_and_t5(t5_pair, make_batch):
    t5, fat5 = t5_pair("t5_v1_1")
    input_ids, attention_mask = make_batch(96, [9, 6])
    batch = dict(input_ids=input_ids, attention_mask=attention_mask)
    expected = _generate(t5, batch, 10)
    assert torch.equal(_generate(fat5, batch, 10), expected)
    short_graphs, short = _compiled_graphs_and_tokens(fat5, batch, 3)
    graphs, tokens = _compiled_graphs_and_tokens(fat5, batch, 10)
    assert torch.equal(tokens, expected)
    assert torch.equal(short, expected[:, : short.shape[1]])
    assert graphs == short_graphs == 1  # no recompilation as the cache fills


@pytest.mark.slow
@pytest.mark.interpreter
def test_patched_t5_static_compiled_generation_on_the_kernels(t5_pair, make_batch):
    if not kernel_ops.kernel_available("attention"):
        pytest.skip("needs triton and fat5_kernels")
    t5, _ = t5_pair("t5_v1_1")
    patched = copy.deepcopy(t5)
    apply_fat5_kernels(patched)
    input_ids, attention_mask = make_batch(96, [9, 6])
    batch = dict(input_ids=input_ids, attention_mask=attention_mask)
    expected = _generate(t5, batch, 6)
    with kernel_ops.kernels_on_cpu():
        graphs, tokens = _compiled_graphs_and_tokens(patched, batch, 6)
    assert torch.equal(tokens, expected)
    assert graphs == 1
