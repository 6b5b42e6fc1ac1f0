"""Finetuning, long-input, encoder-only and generation speed of FAT5 against Hugging Face's T5 on the same weights.

Every provider of a case runs in the same process, one after the other, on the same random weights and batches:

- ``hf_t5``: transformers' ``T5ForConditionalGeneration`` (``T5EncoderModel`` for the encoder cases) with
  ``attn_implementation`` ``eager`` or ``sdpa``, each also under ``torch.compile`` (``+compile``);
- ``hf_t5_patched``: the same stock model after ``fat5_hf.apply_fat5_kernels(model)`` (sdpa where it falls back),
  whose training loss is the fused LM head + cross-entropy kernel (no logits) by default, and whose cached
  generation steps run on the attention kernel as FAT5's; ``hf_t5_patched_ce``: the same with
  ``cross_entropy=True, fused_linear_cross_entropy=False`` (the cross-entropy kernel on the logits);
  ``hf_t5_patched:sdpa_decode`` keeps its cached steps on SDPA (``attention_with_cache=False``);
- ``fat5``: ``FAT5ForConditionalGeneration`` / ``FAT5EncoderModel`` loaded with the T5 weights (state dicts match);
  ``fat5:sdpa_decode`` keeps the attention of its cached generation steps on SDPA
  (``use_triton_attention_with_cache=False``), to compare with the kernel there.

Training steps run under bf16 autocast over fp32 weights with fused AdamW. ``padding="mixed"`` batches draw each
row's input and target lengths from a long-tailed (log-normal) distribution, pad to the batch's longest row
(``DataCollatorForSeq2Seq``'s layout: labels padded with -100, no decoder mask) and count only real tokens in
``tokens_per_s``; ``padding="full"`` rows have the full lengths. ``mfu``: model FLOPs of the real tokens (6 x
parameters x tokens plus attention) per second over the GPU's dense bf16 peak. Generation counts new tokens
(``min_new_tokens = max_new_tokens``) and has no MFU; its rows say which attention ran the decoding steps
(``decode_attention``: ``triton`` when the attention kernel ran with one query a row, else the PyTorch attention
implementation) and, for the patched model, ``vs_fat5``: its tokens/s over the FAT5 row of the same compile mode
and decoding attention. Training rows say in ``lm_loss`` which loss ran, as seen in the step's output: ``fused``
(the fused LM head + loss kernel: the output has no logits) or ``logits`` (an LM head, then a loss on its logits).
A failing configuration (out of memory, no compile) is a row with ``error`` instead of numbers.

Cases (``--cases``, comma-separated; ``--list`` prints them; the default plan is sized for about 8 minutes on one
H100, and ``--max-minutes`` turns the providers not started by a deadline into ``skipped`` rows):
``train_base_<enc>_<dec>_<batch>_<full|mixed>``, ``train_large_512_114_32_<full|mixed>``, ``trainer_<full|lora>``,
``xxl_encoder_b<1|8>``, ``generate_b<1|32>_<greedy|beam4>``.

Usage (GPU machine, repository root)::

    export PYTHONPATH=$PWD/kernels:$PWD
    python benchmarks/finetune_step.py --output-dir benchmarks/results

writes ``finetune_step.json`` and ``finetune_step.md`` there.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import time
import traceback
from dataclasses import dataclass, field

import results_io  # benchmarks/ is on the path: the script runs as python benchmarks/finetune_step.py
import torch

T5_V1_1_BASE = dict(d_model=768, d_kv=64, num_heads=12, d_ff=2048, num_layers=12, num_decoder_layers=12)
T5_V1_1_LARGE = dict(d_model=1024, d_kv=64, num_heads=16, d_ff=2816, num_layers=24, num_decoder_layers=24)
T5_V1_1_XXL = dict(d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24, num_decoder_layers=24)
COMMON = dict(
    vocab_size=32128,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    dropout_rate=0.0,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
)
SHAPES = {"base": T5_V1_1_BASE, "large": T5_V1_1_LARGE, "xxl": T5_V1_1_XXL}

ALL_HF = ("hf_t5:eager", "hf_t5:sdpa", "hf_t5:eager+compile", "hf_t5:sdpa+compile")
TRAIN_PROVIDERS = (*ALL_HF, "hf_t5_patched:sdpa", "hf_t5_patched_ce:sdpa", "fat5")
LONG_PROVIDERS = ("hf_t5:sdpa", "hf_t5:eager+compile", "hf_t5_patched:sdpa", "hf_t5_patched_ce:sdpa", "fat5")
PATCHED = ("hf_t5_patched", "hf_t5_patched_ce")
# H100 / H200 SXM dense bf16 peak (989.4 TFLOP/s); other GPUs: no MFU.
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


@dataclass(frozen=True)
class Case:
    """One measured configuration; `kind` picks the runner ("train", "trainer", "encoder", "generate")."""

    name: str
    kind: str
    shape: str
    enc_len: int
    dec_len: int
    batch: int
    padding: str = "full"
    providers: tuple[str, ...] = TRAIN_PROVIDERS
    options: dict = field(default_factory=dict)


def _cases() -> dict[str, Case]:
    cases = {}
    for enc, dec, batch in ((512, 114, 64), (1024, 256, 32)):
        for padding in ("full", "mixed"):
            name = f"train_base_{enc}_{dec}_{batch}_{padding}"
            cases[name] = Case(name, "train", "base", enc, dec, batch, padding)
    for enc, dec, batch in ((2048, 512, 16), (4096, 1024, 8), (8192, 1024, 4)):
        name = f"train_base_{enc}_{dec}_{batch}_mixed"
        cases[name] = Case(name, "train", "base", enc, dec, batch, "mixed", LONG_PROVIDERS)
    for padding in ("full", "mixed"):
        name = f"train_large_512_114_32_{padding}"
        cases[name] = Case(name, "train", "large", 512, 114, 32, padding)
    trainer_providers = ("hf_t5:eager+compile", "hf_t5:sdpa+compile", "hf_t5_patched:sdpa+compile", "fat5+compile")
    for mode in ("full", "lora"):
        name = f"trainer_{mode}"
        cases[name] = Case(name, "trainer", "base", 512, 114, 32, "mixed", trainer_providers, {"lora": mode == "lora"})
    for batch in (1, 8):
        name = f"xxl_encoder_b{batch}"
        providers = ("hf_t5:eager", "hf_t5:sdpa", "hf_t5:sdpa+compile", "hf_t5_patched:sdpa", "fat5")
        cases[name] = Case(name, "encoder", "xxl", 512, 0, batch, "full", providers)
    for batch in (1, 32):
        for search in ("greedy", "beam4"):
            name = f"generate_b{batch}_{search}"
            providers = ("hf_t5:eager", "hf_t5:sdpa", "hf_t5:sdpa+static_compile", "hf_t5_patched:sdpa",
                         "hf_t5_patched:sdpa+static_compile", "hf_t5_patched:sdpa_decode",
                         "hf_t5_patched:sdpa_decode+static_compile", "fat5", "fat5+static_compile",
                         "fat5:sdpa_decode", "fat5:sdpa_decode+static_compile")  # fmt: skip
            cases[name] = Case(name, "generate", "base", 512, 128, batch, "full", providers,
                               {"num_beams": 4 if search == "beam4" else 1})  # fmt: skip
    return cases


CASES = _cases()
# The default plan (about 8 minutes on one H100): per case, the fastest Hugging Face configurations of the pretraining
# benchmark (sdpa; eager under torch.compile) against the patched stock model and FAT5. `--cases` / `--providers`
# select any others (`--providers all`: each case's whole list).
DEFAULT_PLAN = {
    "train_base_512_114_64_mixed": ("hf_t5:sdpa", "hf_t5:eager+compile", "hf_t5_patched:sdpa", "fat5"),
    "train_base_8192_1024_4_mixed": ("hf_t5:sdpa", "hf_t5_patched:sdpa", "fat5"),
    "xxl_encoder_b8": ("hf_t5:sdpa", "hf_t5_patched:sdpa", "fat5"),
    "generate_b32_greedy": ("hf_t5:sdpa", "hf_t5:sdpa+static_compile", "hf_t5_patched:sdpa",
                            "hf_t5_patched:sdpa+static_compile", "fat5", "fat5+static_compile"),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Models and batches
# ----------------------------------------------------------------------------------------------------------------
def parse_provider(provider: str) -> tuple[str, str | None, str | None]:
    """`"hf_t5:sdpa+compile"` -> `("hf_t5", "sdpa", "compile")`; `"fat5"` -> `("fat5", None, None)`."""
    name, _, compile_mode = provider.partition("+")
    model, _, attn_impl = name.partition(":")
    if model not in ("hf_t5", *PATCHED, "fat5"):
        raise ValueError(
            f"unknown provider {provider!r}: hf_t5:<eager|sdpa>[+compile], hf_t5_patched[_ce]:sdpa[+compile], fat5 "
            "(fat5:sdpa_decode and hf_t5_patched:sdpa_decode for generation)"
        )
    return model, attn_impl or None, compile_mode or None


def build_models(shape: dict, encoder_only: bool, device: str, dtype: torch.dtype, seed: int = 0):
    """A factory `provider -> model` (on `device`, in `dtype`): the first model built gets T5's random
    initialisation, the later ones load its weights (the state dicts of the three kinds of model match)."""
    from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration

    from fat5_hf import FAT5Config, FAT5EncoderModel, FAT5ForConditionalGeneration, apply_fat5_kernels

    hf_class, fat5_class = (T5EncoderModel, FAT5EncoderModel) if encoder_only else (
        T5ForConditionalGeneration, FAT5ForConditionalGeneration)  # fmt: skip
    reference = {}

    def make(provider: str) -> torch.nn.Module:
        model_name, attn_impl, _ = parse_provider(provider)
        decode_on_sdpa = attn_impl == "sdpa_decode"
        if decode_on_sdpa and model_name not in ("fat5", "hf_t5_patched"):
            raise ValueError(f"{provider!r}: sdpa_decode is a fat5 or hf_t5_patched provider (fat5:sdpa_decode)")
        config = T5Config(**{**COMMON, **shape}, attn_implementation="sdpa" if decode_on_sdpa else attn_impl or "sdpa")
        torch.manual_seed(seed)
        with torch.device(device):
            if model_name == "fat5":
                derived = ("model_type", "transformers_version", "architectures", "dense_act_fn", "is_gated_act")
                fields = {k: v for k, v in config.to_dict().items() if k not in derived}
                model = fat5_class(FAT5Config(**fields, use_triton_attention_with_cache=not decode_on_sdpa))
            else:
                model = hf_class(config)
        model = model.to(dtype)
        if reference:
            model.load_state_dict(reference["state"])
        else:
            reference["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if model_name == "hf_t5_patched":
            # the fused LM head + loss and the cached decoding steps on the kernel by default
            apply_fat5_kernels(model, attention_with_cache=not decode_on_sdpa)
        elif model_name == "hf_t5_patched_ce":
            apply_fat5_kernels(model, cross_entropy=True, fused_linear_cross_entropy=False)
        return model

    return make


def draw_lengths(batch: int, max_len: int, padding: str, generator: torch.Generator) -> torch.Tensor:
    """Row lengths: all `max_len` ("full"), or log-normal around 40% of `max_len`, clipped to [8, max_len]."""
    if padding == "full":
        return torch.full((batch,), max_len)
    draws = torch.empty(batch).log_normal_(mean=math.log(0.4 * max_len), std=0.6, generator=generator)
    return draws.round().clamp(min=min(8, max_len), max=max_len).long()


def make_batch(case: Case, vocab_size: int, device: str, seed: int) -> dict:
    """A training batch padded to its longest row: input ids and mask, labels with -100 on padding."""
    gen = torch.Generator().manual_seed(seed)
    enc = draw_lengths(case.batch, case.enc_len, case.padding, gen)
    dec = draw_lengths(case.batch, case.dec_len, case.padding, gen)
    positions = torch.arange(int(enc.max()))
    attention_mask = (positions[None] < enc[:, None]).long()
    input_ids = torch.randint(2, vocab_size, attention_mask.shape, generator=gen) * attention_mask
    labels = torch.randint(2, vocab_size, (case.batch, int(dec.max())), generator=gen)
    labels = labels.masked_fill(torch.arange(labels.shape[1])[None] >= dec[:, None], -100)
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    return {k: v.to(device) for k, v in batch.items()}


def training_flops(shape: dict, vocab_size: int, enc_lengths: torch.Tensor, dec_lengths: torch.Tensor) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward) on the real tokens."""
    d, d_ff, inner = shape["d_model"], shape["d_ff"], shape["num_heads"] * shape["d_kv"]
    attn_proj, mlp = 4 * d * inner, 3 * d * d_ff
    enc_tokens, dec_tokens = float(enc_lengths.sum()), float(dec_lengths.sum())
    # matmul FLOPs: 2 per multiply-add. Encoder blocks: self-attention + MLP; decoder: + cross-attention, + lm_head.
    linear = 2 * shape["num_layers"] * (attn_proj + mlp) * enc_tokens
    linear += 2 * shape["num_decoder_layers"] * (2 * attn_proj + mlp) * dec_tokens + 2 * d * vocab_size * dec_tokens
    # scores and weighted sum: 4 * inner per (query, key) pair; decoder self-attention is causal (half)
    pairs_enc = float((enc_lengths.float() ** 2).sum())
    pairs_dec = float((dec_lengths.float() ** 2).sum()) / 2 + float((dec_lengths * enc_lengths).float().sum())
    attention = 4 * inner * (shape["num_layers"] * pairs_enc + shape["num_decoder_layers"] * pairs_dec)
    return 3 * (linear + attention)


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


# ----------------------------------------------------------------------------------------------------------------
# Runners: each returns the measured fields of one row
# ----------------------------------------------------------------------------------------------------------------
def _shape(case: Case, args: argparse.Namespace) -> dict:
    return SHAPES[case.shape] if args.shape is None else args.shape


def _vocab_size(case: Case, args: argparse.Namespace) -> int:
    return _shape(case, args).get("vocab_size", COMMON["vocab_size"])


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _autocast(device: str):
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16)


def run_train(case: Case, make_model, provider: str, args) -> dict:
    _, _, compile_mode = parse_provider(provider)
    model = make_model(provider).train()
    forward = torch.compile(model) if compile_mode == "compile" else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device.startswith("cuda"))
    batches = [make_batch(case, _vocab_size(case, args), args.device, seed) for seed in range(args.batches)]

    def step(batch):
        with _autocast(args.device):
            outputs = forward(**batch)
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return outputs.loss.detach(), lm_loss_kind(outputs)  # not the outputs: their logits would stay in memory

    for i in range(max(args.warmup_steps, len(batches))):  # every batch shape seen (compiled) before timing
        step(batches[i % len(batches)])
    _synchronize(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    flops = tokens = 0.0
    for i in range(args.steps):
        batch = batches[i % len(batches)]
        loss, lm_loss = step(batch)
        enc = batch["attention_mask"].sum(1).cpu()
        dec = (batch["labels"] != -100).sum(1).cpu()
        tokens += float(enc.sum() + dec.sum())
        flops += training_flops(_shape(case, args), _vocab_size(case, args), enc, dec)
    _synchronize(args.device)
    seconds = time.perf_counter() - start
    return dict(tokens_per_s=tokens / seconds, flops_per_s=flops / seconds, step_ms=1e3 * seconds / args.steps,
                final_loss=float(loss), lm_loss=lm_loss)  # fmt: skip


def lm_loss_kind(outputs) -> str:
    """Which LM loss a training step ran: "fused" (LM head and loss in one kernel: no logits) or "logits"."""
    return "fused" if outputs.logits is None else "logits"


def run_encoder(case: Case, make_model, provider: str, args) -> dict:
    """Forward only, bf16 weights (as text-to-image pipelines run the T5 v1.1 XXL encoder)."""
    _, _, compile_mode = parse_provider(provider)
    model = make_model(provider).eval()
    forward = torch.compile(model) if compile_mode == "compile" else model
    batch = make_batch(case, _vocab_size(case, args), args.device, 0)
    batch.pop("labels")
    with torch.no_grad():
        for _ in range(args.warmup_steps):
            forward(**batch)
        _synchronize(args.device)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            forward(**batch)
        _synchronize(args.device)
    seconds = (time.perf_counter() - start) / args.steps
    shape, tokens = _shape(case, args), case.batch * case.enc_len
    inner = shape["num_heads"] * shape["d_kv"]
    flops = 2 * shape["num_layers"] * (4 * shape["d_model"] * inner + 3 * shape["d_model"] * shape["d_ff"]) * tokens
    flops += 4 * inner * shape["num_layers"] * case.batch * case.enc_len**2
    return dict(tokens_per_s=tokens / seconds, flops_per_s=flops / seconds, step_ms=1e3 * seconds)


def run_generate(case: Case, make_model, provider: str, args) -> dict:
    """`generate()` of `case.dec_len` new tokens (bf16 weights); `+static_compile`: static cache, compiled step."""
    _, _, compile_mode = parse_provider(provider)
    model = make_model(provider).eval()
    batch = make_batch(case, _vocab_size(case, args), args.device, 0)
    batch.pop("labels")
    kwargs = dict(max_new_tokens=case.dec_len, min_new_tokens=case.dec_len, do_sample=False,
                  num_beams=case.options.get("num_beams", 1))  # fmt: skip
    if compile_mode == "static_compile":
        kwargs["cache_implementation"] = "static"
        if not args.device.startswith("cuda"):  # transformers compiles the step on its own on CUDA only
            from transformers.generation import CompileConfig

            compile_config = CompileConfig(backend="eager", fullgraph=True, mode=None)
            compile_config._compile_all_devices = True
            kwargs["compile_config"] = compile_config
    elif compile_mode is not None:
        raise ValueError(f"generation providers take +static_compile, not +{compile_mode}")
    with torch.no_grad():
        with decode_kernel_launches() as launches:  # the first run, which also compiles
            for _ in range(max(args.generate_warmup, 1)):
                model.generate(**batch, **kwargs)
        _synchronize(args.device)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.generate_repeats):
            out = model.generate(**batch, **kwargs)
        _synchronize(args.device)
    seconds = (time.perf_counter() - start) / args.generate_repeats
    new_tokens = case.batch * (out.shape[1] - 1)
    decode_attention = "triton" if launches["n"] else model.config._attn_implementation
    return dict(tokens_per_s=new_tokens / seconds, step_ms=1e3 * seconds, decode_attention=decode_attention)


@contextlib.contextmanager
def decode_kernel_launches():
    """Count the attention kernel's launches with one query a row (decoding steps) in the block, as ``{"n": count}``.

    Counted in the launcher that the kernel's custom ops call when they run, below `torch.compile`'s graph: a
    counter in traced code would add a guard to it (and a recompilation a step).
    """
    launches = {"n": 0}
    try:
        from fat5_kernels import attention
    except ImportError:  # no triton: nothing to count
        yield launches
        return
    launch = attention.t5_attention_forward

    def counting(q, *args, cu_seqlens_q=None, **kwargs):
        if cu_seqlens_q is None and q.shape[2] == 1:
            launches["n"] += 1
        return launch(q, *args, cu_seqlens_q=cu_seqlens_q, **kwargs)

    attention.t5_attention_forward = counting
    try:
        yield launches
    finally:
        attention.t5_attention_forward = launch


def run_trainer(case: Case, make_model, provider: str, args) -> dict:
    """`transformers.Trainer` (bf16, `torch_compile` for `+compile`), full finetuning or LoRA (peft) on q/v."""
    import tempfile

    from transformers import Trainer, TrainerCallback, TrainingArguments

    _, _, compile_mode = parse_provider(provider)
    model = make_model(provider)
    if case.options.get("lora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
        )
    batches = [make_batch(case, _vocab_size(case, args), "cpu", seed) for seed in range(args.batches)]
    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(case.batch)]

    def collate(features):  # pad to the batch's longest row, as DataCollatorForSeq2Seq
        enc = max(int(f["attention_mask"].sum()) for f in features)
        dec = max(int((f["labels"] != -100).sum()) for f in features)
        return dict(input_ids=torch.stack([f["input_ids"][:enc] for f in features]),
                    attention_mask=torch.stack([f["attention_mask"][:enc] for f in features]),
                    labels=torch.stack([f["labels"][:dec] for f in features]))  # fmt: skip

    lm_losses = set()

    class LossRecordingTrainer(Trainer):  # notes which LM loss each step ran
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
            lm_losses.add(lm_loss_kind(outputs))
            return (loss, outputs) if return_outputs else loss

    class Timer(TrainerCallback):
        tokens = 0.0
        start = None

        def on_step_begin(self, targs, state, control, **kw):
            if state.global_step == args.warmup_steps:
                _synchronize(args.device)
                self.start = time.perf_counter()

        def on_train_end(self, targs, state, control, **kw):
            _synchronize(args.device)
            self.seconds = time.perf_counter() - self.start

    real_tokens = [float(r["attention_mask"].sum() + (r["labels"] != -100).sum()) for r in rows]
    total_steps = args.warmup_steps + args.steps
    with tempfile.TemporaryDirectory() as output_dir:
        targs = TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=case.batch, max_steps=total_steps, bf16=True,
            use_cpu=args.device == "cpu",
            torch_compile=compile_mode == "compile", optim="adamw_torch_fused", learning_rate=1e-4, report_to=[],
            save_strategy="no", logging_steps=total_steps, dataloader_drop_last=True, remove_unused_columns=False,
        )  # fmt: skip
        timer = Timer()
        trainer = LossRecordingTrainer(
            model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[timer]
        )
        trainer.train()
    # the sampler shuffles: count the timed steps' tokens as the mean row's
    tokens = args.steps * case.batch * sum(real_tokens) / len(real_tokens)
    return dict(tokens_per_s=tokens / timer.seconds, step_ms=1e3 * timer.seconds / args.steps,
                lm_loss="+".join(sorted(lm_losses)))  # fmt: skip


RUNNERS = {"train": run_train, "encoder": run_encoder, "generate": run_generate, "trainer": run_trainer}


def row_identity(case: Case, provider: str) -> dict:
    """The fields that say what a row measured."""
    model_name, attn_impl, compile_mode = parse_provider(provider)
    row = dict(case=case.name, model=model_name, attn_impl=attn_impl or "triton", compile=compile_mode or "none",
               enc_len=case.enc_len, dec_len=case.dec_len, batch=case.batch, padding=case.padding)  # fmt: skip
    if case.kind == "generate":
        row["num_beams"] = case.options.get("num_beams", 1)
    return row


def measure(case: Case, make_model, provider: str, args) -> dict:
    """One result row; an exception (out of memory, compile failure, missing package) becomes its `error`."""
    row = row_identity(case, provider)
    try:
        result = RUNNERS[case.kind](case, make_model, provider, args)
        peak = peak_flops()
        flops = result.pop("flops_per_s", None)
        row.update(
            tokens_per_s=round(result.pop("tokens_per_s")),
            mfu=round(flops / peak, 4) if flops is not None and peak else None,
            peak_GiB=round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.device.startswith("cuda") else None,
            **{k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()},
        )
    except Exception as err:  # noqa: BLE001 - one failing configuration must not hide the others
        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        traceback.print_exc(limit=3)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row


def run_case(case: Case, providers: tuple[str, ...], args) -> list[dict]:
    """The rows of `case`, one per provider; a provider reached after `args.deadline` is a `skipped` error row."""
    # weights: fp32 for training (under bf16 autocast), bf16 for inference
    dtype = torch.bfloat16 if case.kind in ("encoder", "generate") else torch.float32
    make_model = build_models(_shape(case, args), case.kind == "encoder", args.device, dtype)
    rows = []
    for provider in providers:
        if args.deadline is not None and time.monotonic() > args.deadline:
            rows.append({**row_identity(case, provider), "error": "skipped: --max-minutes reached"})
            continue
        start = time.monotonic()
        row = measure(case, make_model, provider, args)
        row["wall_s"] = round(time.monotonic() - start, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    add_speedups(rows)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """`vs_best_hf`: tokens/s over the fastest `hf_t5` row of the same case (None where there is none); generation
    rows of the patched model also get `vs_fat5`: over the `fat5` row of the same compile mode and decoding attention
    (`sdpa_decode` or not), from their step times (the same tokens a step; tokens/s is rounded to whole tokens)."""
    best = max((r["tokens_per_s"] for r in rows if r["model"] == "hf_t5" and "error" not in r), default=None)
    fat5_step_ms = {
        (r["compile"], r["attn_impl"] == "sdpa_decode"): r["step_ms"]
        for r in rows
        if r["model"] == "fat5" and "error" not in r
    }
    for row in rows:
        row["vs_best_hf"] = round(row["tokens_per_s"] / best, 3) if best and "error" not in row else None
        if row["model"] in PATCHED and "num_beams" in row:
            reference = fat5_step_ms.get((row["compile"], row["attn_impl"] == "sdpa_decode"))
            row["vs_fat5"] = round(reference / row["step_ms"], 3) if reference and "error" not in row else None


MD_COLUMNS = ("case", "model", "attn_impl", "compile", "lm_loss", "enc_len", "dec_len", "batch", "padding",
              "tokens_per_s", "vs_best_hf", "vs_fat5", "mfu", "peak_GiB", "decode_attention", "error")  # fmt: skip
METHOD = (
    "Tokens/s: real tokens (training), new tokens (generation); `vs_best_hf`: over the fastest `hf_t5` row of the "
    "case; `vs_fat5` (patched model, generation): over the `fat5` row of the same compile mode and decoding "
    "attention. Each model is built from the same weights in the same process; see `benchmarks/finetune_step.py` and "
    "`benchmarks/README.md` for the set-up."
)


def write_results(output_dir: str, args: dict, rows: list[dict]) -> str:
    """Write `finetune_step.json` (`{"environment", "args", "rows"}`) and `finetune_step.md`; returns the JSON path."""
    json_path, _ = results_io.write_results(
        "finetune_step", rows, env=results_io.environment(), args=args, title="Finetuning step, generation and "
        "encoder forward: FAT5 and patched stock T5 against Hugging Face T5", method=METHOD,
        columns=[results_io.Column(name, name) for name in MD_COLUMNS], output_dir=output_dir,
    )  # fmt: skip
    return str(json_path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=None,
                        help="comma-separated case names or 'all' (default: the default plan's cases)")  # fmt: skip
    parser.add_argument("--providers", default=None,
                        help="comma-separated providers, run where a case lists them, or 'all' (default: the default "
                             "plan's for its cases, else each case's whole list)")  # fmt: skip
    parser.add_argument("--list", action="store_true", help="print the cases and their providers, then exit")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (training, encoder)")
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--batches", type=int, default=2, help="distinct batches cycled (each a compiled shape)")
    parser.add_argument("--generate-warmup", type=int, default=1)
    parser.add_argument("--generate-repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--max-minutes", type=float, default=None, help="providers not started by then become 'skipped' rows"
    )
    parser.add_argument("--output-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    args.shape = None  # tests replace the model shape
    args.deadline = None if args.max_minutes is None else time.monotonic() + 60 * args.max_minutes
    return args


def selected(args: argparse.Namespace) -> list[tuple[Case, tuple[str, ...]]]:
    """The (case, providers) pairs to run."""
    if args.cases is None:
        names = list(DEFAULT_PLAN)
    elif args.cases == "all":
        names = list(CASES)
    else:
        names = [n.strip() for n in args.cases.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; --list shows the {len(CASES)} cases")
    if args.providers not in (None, "all"):
        wanted = [p.strip() for p in args.providers.split(",") if p.strip()]
        for provider in wanted:
            parse_provider(provider)
        return [(CASES[n], tuple(p for p in CASES[n].providers if p in wanted)) for n in names]
    if args.providers is None:
        return [(CASES[n], DEFAULT_PLAN.get(n, CASES[n].providers)) for n in names]
    return [(CASES[n], CASES[n].providers) for n in names]


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    plan = selected(args)
    if args.list:
        for case, providers in plan:
            print(f"{case.name}: {', '.join(providers)}")
        return []
    rows = []
    for case, providers in plan:
        rows.extend(run_case(case, providers, args))
    recorded = {k: v for k, v in vars(args).items() if k not in ("list", "output_dir", "shape", "deadline")}
    print(write_results(args.output_dir, recorded, rows))
    return rows


if __name__ == "__main__":
    main()
