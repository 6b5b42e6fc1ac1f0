"""Worker of test_fsdp2.py, run by `torch.distributed.run` with 2 CPU processes (gloo).

Shards FAT5 and checks the loss, every gradient and greedy generation against the same model unsharded. Modes
(first argument):

* ``pytorch`` / ``kernels``: every FAT5Block its own unit, the shared embedding (tied to the LM head) in the root
  unit. With ``kernels`` the Triton kernels run under the interpreter: later blocks then read the relative-bias
  table of block 0, whose parameters FSDP2 frees after block 0's forward.
* ``carved``: what Accelerate 1.15's FSDP2 preparation does to a model with its own LM head (FAT5-small): the
  blocks, then the input embedding and the LM head each in a unit of their own, then the root; the stacks call
  the shared embedding module itself (`set_input_embeddings`, as the pretraining recipe does before preparing).
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from fat5_hf import FAT5Config, FAT5ForConditionalGeneration, kernel_ops
from fat5_hf.modeling_fat5 import FAT5Block, _block_hidden_states_observed


def main(mode: str) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    config = FAT5Config(
        vocab_size=96, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=3,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, tie_word_embeddings=True,
    )  # fmt: skip
    model = FAT5ForConditionalGeneration(config)
    if mode == "carved":  # a head of its own, as recipes/pretrain.py gives FAT5-small
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    reference = FAT5ForConditionalGeneration(config)
    if mode == "carved":
        reference.lm_head.weight = torch.nn.Parameter(reference.lm_head.weight.detach().clone())
    reference.load_state_dict(model.state_dict())
    for module in model.modules():
        if isinstance(module, FAT5Block):
            fully_shard(module)
    if mode == "carved":
        model.set_input_embeddings(model.get_input_embeddings())
        fully_shard(model.get_input_embeddings())
        fully_shard([model.get_output_embeddings()], reshard_after_forward=False)
    fully_shard(model)
    if mode != "carved":
        assert model.shared.weight is model.lm_head.weight, "the tie must survive sharding"
    # FSDP2's hooks on the blocks read no hidden states: each block still leaves its feed-forward add to the next
    # block's first norm, and the checks below cover that path
    assert all(block._forward_pre_hooks for block in model.encoder.block), "FSDP2 hooks the blocks"
    assert not _block_hidden_states_observed(model.encoder.block)
    assert not _block_hidden_states_observed(model.decoder.block)

    # the same batch on both ranks: FSDP's averaged gradient then equals the unsharded one
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, 96, (2, 37), generator=generator)
    labels = torch.randint(2, 96, (2, 21), generator=generator)
    context = kernel_ops.kernels_on_cpu() if mode == "kernels" else torch.enable_grad()
    with context:
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        grads = {name: parameter.grad.full_tensor() for name, parameter in model.named_parameters()}
        model.unshard()  # the root unit (shared embedding) around generate, as the recipe's evaluation does
        generated = model.generate(input_ids=input_ids, max_new_tokens=5, do_sample=False)
        model.reshard()
    expected_loss = reference(input_ids=input_ids, labels=labels).loss
    expected_loss.backward()
    torch.testing.assert_close(loss.detach(), expected_loss.detach(), rtol=1e-5, atol=1e-5)
    for name, parameter in reference.named_parameters():
        torch.testing.assert_close(
            grads[name], parameter.grad, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}"
        )
    expected_generated = reference.generate(input_ids=input_ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(generated, expected_generated), (generated, expected_generated)
    print(f"rank {dist.get_rank()}: FSDP2 matches (loss {loss.item():.6f})", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
