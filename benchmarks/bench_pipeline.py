"""quantize_model end to end: where the time goes (forward passes, Hessian, solve, packing) and peak memory.

CPU: the embedded SmolLM2-135M (installed on first use by ``maca_kernels.embedded``), 4-bit g64, GPTQ with
fixed and with MaCa calibration on the Jargon File at 8192 tokens, and RTN. GPU: a random-weight model
shaped like Llama-3-8B (hidden 4096, intermediate 14336, 32 heads, 8 KV heads) cut to 4 layers, bf16,
kept on the CPU while each layer runs on the GPU, 32k random calibration tokens, 4-bit g128.

    python -m benchmarks.bench_pipeline [--cpu] [--gpu]
"""

from __future__ import annotations

import copy
import time

import torch

from benchmarks.common import run_benchmark
from maca_kernels import calibration, quantize_model

COLUMNS = ["device", "model", "method", "calib", "tokens", "wall_s", "forward_s", "hessian_s", "solve_s", "pack_s",
           "peak_mb"]


def _row(device, model_name, method, calib_name, tokens, wall, stats) -> dict:
    return dict(device=device, model=model_name, method=method, calib=calib_name, tokens=tokens, wall_s=wall,
                forward_s=stats.forward_s, hessian_s=stats.hessian_s, solve_s=stats.solve_s, pack_s=stats.pack_s,
                peak_mb=stats.peak_memory_mb)


def bench_cpu(tokens: int = 8192) -> list[dict]:
    from maca_kernels import embedded

    try:
        embedded.ensure_all(install=True)
    except RuntimeError as exc:  # no apt/root: say so, measure nothing
        print(f"CPU pipeline benchmark skipped: {exc}")
        return []
    fp, tok = embedded.load_model()
    ids, _ = calibration.holdout_split(calibration.load_token_ids(text=embedded.jargon_text(), tokenizer=tok))
    cases = [("gptq", "fixed", calibration.fixed(ids, 2048, total_tokens=tokens, seed=0)),
             ("gptq", "maca", calibration.matryoshka(ids, total_tokens=tokens, seed=0)),
             ("rtn", "-", None)]
    dev = f"cpu ({torch.get_num_threads()} threads)"
    rows = []
    for method, name, calib in cases:
        model = copy.deepcopy(fp)
        t0 = time.perf_counter()
        quantize_model(model, calib, 4, 64, method=method, weighting="sequence" if name == "maca" else "token",
                       progress=False, log=None)
        rows.append(_row(dev, "SmolLM2-135M", method, name, tokens if calib is not None else 0,
                         time.perf_counter() - t0, model.quantize_stats))
        del model
    return rows


LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=32000)
TINY_LLAMA = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)


def random_llama(shape: dict, layers: int, tokens: int, dtype=torch.bfloat16, method: str = "gptq",
                 device: str = "cuda", activations: str = "auto") -> dict:
    """A random-weight Llama of ``shape`` cut to ``layers`` decoder layers, kept on the CPU while each layer runs on
    ``device``; a MaCa mix of random sequences (128/512/1024/2048 tokens, 1/2 of the tokens in the 128s) scaled to
    ``tokens``; 4-bit g128. One row: the time split, time per layer, peak memory and what each part held."""
    import transformers as tf

    config = tf.LlamaConfig(**shape, num_hidden_layers=layers, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    mix = [128] * 64 + [512] * 16 + [1024] * 8 + [2048] * 4  # 32768 tokens
    seqs = [torch.randint(0, shape["vocab_size"], (n,), generator=g) for n in mix * max(1, tokens // 32768)]
    seqs = seqs[: max(1, tokens * len(mix) // 32768)]
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    quantize_model(model, seqs, 4, min(128, shape["hidden_size"]), method=method, device=device,
                   activations=activations, progress=False, log=None)
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    st = model.quantize_stats
    kind = "Llama-3-8B shape" if shape == LLAMA3_8B else "tiny Llama"
    name = f"{kind}, {layers} layers, {str(dtype).removeprefix('torch.')}"
    row = _row(torch.cuda.get_device_name() if cuda else "cpu", name, method, "maca mix",
               sum(s.numel() for s in seqs), wall, st)
    row.update(per_layer_s=wall / layers, activations_on=st.activations_on, memory_mb=dict(st.memory_mb))
    return row


def bench_gpu(tokens: int = 32768) -> list[dict]:
    return [random_llama(LLAMA3_8B, 4, tokens)]


def main() -> None:
    run_benchmark("pipeline", __doc__, bench_cpu, bench_gpu, COLUMNS,
                  "seconds per part of quantize_model; peak_mb: peak RSS on the CPU, peak allocated on a GPU")


if __name__ == "__main__":
    main()
