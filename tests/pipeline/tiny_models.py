"""Tiny random-weight causal LMs built in the tests (no download): Llama, Qwen2/3, Mistral, Gemma2/3 shapes, and
Mixtral / Qwen3-MoE with fused experts."""

from __future__ import annotations

import torch


def tiny_model(family: str = "llama", seed: int = 0, layers: int = 2):
    import transformers as tf

    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama":
        config = tf.LlamaConfig(**common)
        cls = tf.LlamaForCausalLM
    elif family == "qwen2":
        config = tf.Qwen2Config(**common)  # q/k/v carry biases
        cls = tf.Qwen2ForCausalLM
    elif family == "qwen3":
        config = tf.Qwen3Config(**common, head_dim=16)  # q/k norms
        cls = tf.Qwen3ForCausalLM
    elif family == "mistral":
        config = tf.MistralConfig(**common, sliding_window=32)
        cls = tf.MistralForCausalLM
    elif family == "gemma2":
        config = tf.Gemma2Config(**common, head_dim=16, sliding_window=32)
        cls = tf.Gemma2ForCausalLM
    elif family == "gemma3":
        config = tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=32)
        cls = tf.Gemma3ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # the default init is tiny; larger weights make quantization error visible
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


def random_sequences(lengths, vocab: int = 96, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


class ByteTokenizer:
    """A stand-in tokenizer (bytes mod the tiny vocab) so the CLI and the demo run without a hub."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [b % 96 for b in text.encode()]}

    def save_pretrained(self, path):
        pass


def tiny_moe(family: str):
    import transformers as tf

    common = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=256)
    if family == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(**common, intermediate_size=128, num_local_experts=4))
    elif family == "qwen3_moe":
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**common, intermediate_size=128, moe_intermediate_size=64,
                                                         num_experts=4, head_dim=16))
    elif family == "qwen2_moe":  # a shared expert beside the routed ones, with a scalar gate
        model = tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(**common, intermediate_size=128, moe_intermediate_size=64,
                                                         shared_expert_intermediate_size=64, num_experts=4))
    elif family == "olmoe":
        model = tf.OlmoeForCausalLM(tf.OlmoeConfig(**common, intermediate_size=64, num_experts=4, eos_token_id=None))
    elif family == "deepseek_v3":  # MLA attention, a dense first layer, a shared expert
        model = tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(
            **dict(common, num_key_value_heads=4), intermediate_size=128, moe_intermediate_size=64, n_routed_experts=4,
            n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=16,
            qk_nope_head_dim=16, v_head_dim=16, n_group=1, topk_group=1))
    else:
        raise ValueError(family)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    return model.eval()
