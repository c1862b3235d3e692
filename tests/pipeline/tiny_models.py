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


class ListMoeBlock(torch.nn.Module):
    """A sparse MoE block in the older per-expert form (a router ``gate`` Linear, an ``experts`` ModuleList of MLPs,
    a loop over experts that calls each with its tokens, slot by slot), holding a fused Qwen3-MoE block's weights."""

    def __init__(self, fused, names=("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        nn = torch.nn
        E, two_i, d = fused.experts.gate_up_proj.shape
        inter = two_i // 2
        self.top_k, self.norm, self.act = fused.gate.top_k, fused.gate.norm_topk_prob, fused.experts.act_fn
        self.gate = nn.Linear(d, E, bias=False)
        self.gate.weight.data.copy_(fused.gate.weight.data)
        self.experts = nn.ModuleList()
        for e in range(E):
            mlp = ListExpert(d, inter, names, self.act)
            gu = fused.experts.gate_up_proj.data[e]
            mlp.get_submodule(names[0]).weight.data.copy_(gu[:inter])
            mlp.get_submodule(names[1]).weight.data.copy_(gu[inter:])
            mlp.get_submodule(names[2]).weight.data.copy_(fused.experts.down_proj.data[e])
            self.experts.append(mlp)

    def forward(self, hidden_states):
        b, L, d = hidden_states.shape
        x = hidden_states.reshape(-1, d)
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float)
        w, sel = torch.topk(probs, self.top_k, dim=-1)
        w = (w / w.sum(-1, keepdim=True) if self.norm else w).to(x.dtype)
        mask = torch.nn.functional.one_hot(sel, len(self.experts)).permute(2, 1, 0)  # [E, k, T]
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            slot, tok = torch.where(mask[e])  # slot-major, not token order
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
        return out.reshape(b, L, d)


class ListExpert(torch.nn.Module):
    def __init__(self, d, inter, names, act):
        super().__init__()
        self.names, self.act = names, act
        for n, (k, m) in zip(names, ((d, inter), (d, inter), (inter, d)), strict=True):
            self.add_module(n, torch.nn.Linear(k, m, bias=False))

    def forward(self, x):
        g, u, down = (self.get_submodule(n) for n in self.names)
        return down(self.act(g(x)) * u(x))


def tiny_moe(family: str):
    """A tiny MoE model of ``family``; "list" / "list_w123": Qwen3-MoE with its experts as a ModuleList of MLPs
    (Linears named gate/up/down_proj, or Mixtral's older w1/w3/w2)."""
    import transformers as tf

    if family.startswith("list"):
        model = tiny_moe("qwen3_moe")
        names = ("w1", "w3", "w2") if family == "list_w123" else ("gate_proj", "up_proj", "down_proj")
        for layer in model.model.layers:
            layer.mlp = ListMoeBlock(layer.mlp, names)
        return model.eval()

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
