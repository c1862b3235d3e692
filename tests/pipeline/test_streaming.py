"""quantize_folder (pipeline/streamed.py): a model folder quantized into a checkpoint folder one decoder layer at a
time, bit for bit the checkpoint that quantize_model + save_quantized write for the same arguments; resumable; its peak
memory flat in the number of layers."""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import random_sequences, tiny_model

import maca_kernels as mk
from maca_kernels.resume import ResumeError

CALIB = random_sequences([16, 16, 32, 8, 24])


def same_folders(a, b) -> None:
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    differ = [n for n in names if not filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False)]
    assert not differ, differ


def in_memory(src, out, dtype, bits, group, shard, **kw):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    mk.quantize_model(model, CALIB, bits, group, progress=False, log=None, **kw)
    mk.save_quantized(model, out, max_shard_size=shard)


@pytest.mark.parametrize("family,dtype,bits,group,kw", [
    ("llama", torch.float32, 4, 32, {}),
    ("qwen3", torch.float32, 3, 64, dict(method="gptaq", act_order=True)),
    ("gemma3", torch.float32, 2, -1, dict(weighting="token")),  # tied head, embedding scale, sliding window
    ("qwen2", torch.bfloat16, 4, 64, dict(keep_float=("down_proj",), sym=True)),  # q/k/v biases, bf16
])
def test_same_checkpoint_as_in_memory(tmp_path, family, dtype, bits, group, kw):
    src = tmp_path / "src"
    tiny_model(family, seed=2, layers=3).to(dtype).save_pretrained(src, max_shard_size="30KB")
    in_memory(src, tmp_path / "a", dtype, bits, group, "40KB", **kw)
    out = mk.quantize_folder(src, tmp_path / "b", CALIB, bits, group, dtype=dtype, max_shard_size="40KB",
                             progress=False, log=None, **kw)
    assert out == tmp_path / "b" and len(list(out.glob("model-*.safetensors"))) > 1  # several shards
    same_folders(tmp_path / "a", tmp_path / "b")
    loaded = mk.load_quantized(out)
    assert loaded(torch.arange(12)[None]).logits.isfinite().all()


def test_resume_after_an_interruption_gives_the_same_bits(tmp_path):
    src = tmp_path / "src"
    tiny_model("llama", seed=3, layers=4).save_pretrained(src)
    kw = dict(dtype=torch.float32, progress=False, log=None)
    mk.quantize_folder(src, tmp_path / "whole", CALIB, 4, 32, **kw)

    def stop(name, H, r):
        if name.startswith("model.layers.2."):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mk.quantize_folder(src, tmp_path / "b", CALIB, 4, 32, resume_dir=tmp_path / "state", callback=stop, **kw)
    assert not (tmp_path / "b").exists()  # nothing half-written in place
    seen = []
    mk.quantize_folder(src, tmp_path / "b", CALIB, 4, 32, resume_dir=tmp_path / "state",
                       callback=lambda name, H, r: seen.append(name), **kw)
    assert seen and all(n.startswith(("model.layers.2.", "model.layers.3.")) for n in seen)  # 0, 1 resumed
    same_folders(tmp_path / "whole", tmp_path / "b")
    with pytest.raises(ResumeError):  # another model's state is refused
        tiny_model("llama", seed=4, layers=4).save_pretrained(tmp_path / "other")
        mk.quantize_folder(tmp_path / "other", tmp_path / "c", CALIB, 4, 32, resume_dir=tmp_path / "state", **kw)


def test_bad_input_refused_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        mk.quantize_folder(tmp_path, tmp_path / "out", CALIB)
    src = tmp_path / "src"
    model = tiny_model("llama", layers=2)
    model.save_pretrained(src)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        mk.quantize_folder(src, tmp_path / "taken", CALIB, log=None)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    with pytest.raises(TypeError, match="unexpected options"):
        mk.quantize_folder(src, tmp_path / "out", CALIB, bitz=3)
    mk.quantize_folder(src, tmp_path / "q", CALIB, 4, 32, progress=False, log=None)
    with pytest.raises(ValueError, match="divisor of in_features = 64, got 128 .model.layers.0.self_attn.q_proj"):
        mk.quantize_folder(src, tmp_path / "out", CALIB, 4, 128, log=None)
    with pytest.raises(ValueError, match="already quantized"):
        mk.quantize_folder(tmp_path / "q", tmp_path / "out", CALIB)


PEAK = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    import maca_kernels as mk
    from tiny_models import random_sequences
    calib = random_sequences([64] * 4, vocab=96)
    mk.quantize_folder({src!r}, {out!r}, calib, 4, 128, dtype=torch.float32, max_shard_size="8MB", progress=False,
                       log=None)
""")
# The child's own peak, VmHWM of its address space, printed as it ends. Not wait4's ru_maxrss: Linux keeps in it the
# peak of the address space the child had before exec, which is the parent's (vfork shares it, fork copies it), so a
# test session that had grown to 1 GB made every child "peak" at 1 GB or more, whatever the child did.
HWM = textwrap.dedent("""
    import atexit
    atexit.register(lambda: print("VmHWM", next(int(line.split()[1]) for line in open("/proc/self/status")
                                                 if line.startswith("VmHWM")), flush=True))
""")


def _peak_mb(code: str) -> float:
    # MALLOC_MMAP_THRESHOLD_: the tensors of a real layer (tens of MB and more) are mmap'd by glibc and go back to
    # the system when freed; these test layers' few-MB tensors would otherwise come from a heap whose fragmentation
    # is glibc's, not the pipeline's (measured: +34 MB for 6 more layers without it, +5 MB with it)
    # a clean environment: what earlier tests of a session leave in os.environ must not change the measurement
    keep = ("PATH", "HOME", "LANG", "TMPDIR", "TRITON_INTERPRET", "HF_HUB_OFFLINE", "PYTHONPATH")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, "-c", HWM + code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split("VmHWM")[-1]) / 1024


def test_peak_memory_flat_in_the_number_of_layers(tmp_path):
    """A Llama of hidden 1024 (a decoder layer: 12.6 M weights, 48 MB in float32): 8 layers instead of 2 raise the
    streamed run's peak resident memory by less than one layer (loading the model would add 6). Measured: +1 MB.
    (The growth that once depended on what ran before in the session was the parent's peak in wait4's ru_maxrss.)"""
    import transformers as tf

    tests = os.path.dirname(os.path.abspath(__file__))
    peaks = {}
    for layers in (2, 8):
        cfg = tf.LlamaConfig(vocab_size=96, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
                             num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=256)
        torch.manual_seed(0)
        tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / f"src{layers}", max_shard_size="8MB")
        peaks[layers] = _peak_mb(PEAK.format(tests=tests, src=str(tmp_path / f"src{layers}"),
                                             out=str(tmp_path / f"out{layers}")))
    layer_mb = (2 * 1024 * 1024 + 2 * 1024 * 512 + 3 * 1024 * 3072) * 4 / 2**20  # q, o; k, v (8 of 16 heads); MLP
    print(f"peak RSS {peaks} MB, a layer {layer_mb:.1f} MB")
    assert peaks[8] - peaks[2] < layer_mb, (peaks, layer_mb)


def test_a_checkpoint_transformers_converts_is_refused_clearly(tmp_path):
    """transformers 5 saves Mixtral's fused experts under their per-expert names and fuses them while loading:
    quantize_folder reads tensors by the model's names, so it says so (the CLI then loads the whole model)."""
    from tiny_models import tiny_moe

    from maca_kernels.pipeline.streamed import unstreamable

    tiny_moe("mixtral").save_pretrained(tmp_path / "moe")
    assert "not in the checkpoint under these names" in unstreamable(tmp_path / "moe")
    with pytest.raises(ValueError, match="from_pretrained and use quantize_model"):
        mk.quantize_folder(tmp_path / "moe", tmp_path / "out", CALIB, 4, 32, method="rtn", keep_float=("experts",),
                           log=None)
    tiny_model("llama").save_pretrained(tmp_path / "llama")
    assert unstreamable(tmp_path / "llama") is None
