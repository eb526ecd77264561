"""finetune/distributed/sharding.py: the input embedding is an FSDP unit of its own unless tied to the head."""

import torch

# ---- the input embedding is an FSDP unit of its own --------------------------------------------------------

def test_embedding_is_its_own_fsdp_unit_unless_tied():
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    import modeling_baichuan
    from finetune.distributed.sharding import shard_model

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        baichuan = modeling_baichuan.BaichuanForCausalLM(modeling_baichuan.BaichuanConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            model_max_length=64))
        shard_model(baichuan)
        assert type(baichuan.get_input_embeddings()).__name__.startswith("FSDP")
        assert not type(baichuan.get_output_embeddings()).__name__.startswith("FSDP")
        ids = torch.randint(64, (1, 8))
        baichuan(input_ids=ids, labels=ids).loss.backward()  # the units gather and reduce in order
        assert baichuan.get_input_embeddings().weight.grad is not None
        tied = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, tie_word_embeddings=True))
        shard_model(tied)
        assert not type(tied.get_input_embeddings()).__name__.startswith("FSDP")
    finally:
        dist.destroy_process_group()
