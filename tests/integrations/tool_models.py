"""A tiny random Llama saved as a model folder with a word-level tokenizer (the tools insist on one, even
for pre-tokenized calibration) and variable-length calibration sequences, for the integration tests."""

from __future__ import annotations

from pathlib import Path

import torch

LENGTHS = (64, 128, 192, 256)
VOCAB = 1024  # enough distinct tokens that every layer input spans in_features (a well-posed H)


def save_tiny_model(root) -> str:
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = Path(root) / "tiny_llama"
    # in_features 128 / 256: GPTQModel's group parameters come from the weights as of the block start
    # (GPTQ's reference code), ours from up-to-date weights; with group = block = 128 the two coincide.
    config = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # the default init is tiny; larger weights make quantization error visible
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path)
    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", bos_token="t1",
                            eos_token="t2").save_pretrained(path)
    return str(path)


def calibration(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]
