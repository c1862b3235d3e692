"""``maca-kernels`` / ``python -m maca_kernels``: quantize, eval, bench, demo, study.

Exit codes: 0 success, 1 a run failed (the one-line reason is printed), 2 bad arguments or inputs
(unknown model path, unsupported architecture, bits, group size, text too short, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad arguments or inputs: exit code 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="maca-kernels", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a Hugging Face causal LM and write a GPTQ checkpoint")
    q.add_argument("--model", required=True, help="a model folder, or 'demo' for the embedded SmolLM2-135M")
    q.add_argument("--out", required=True, help="output folder (GPTQ checkpoint): new or empty, or a checkpoint "
                   "written here before with --overwrite")
    q.add_argument("--overwrite", action="store_true",
                   help="replace the checkpoint in --out (only its own files; anything else there is kept)")
    q.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    q.add_argument("--group-size", type=int, default=128, help="columns per group, -1 for one group per row")
    q.add_argument("--method", default="gptq", choices=("gptq", "gptaq", "rtn"))
    q.add_argument("--calib", default="maca", choices=("maca", "fixed"),
                   help="maca: lengths 128/512/1024/2048, each sequence one sample; fixed: 2048-token windows")
    q.add_argument("--text", help="calibration text file (plain or .gz); default for --model demo: the Jargon File")
    q.add_argument("--calib-tokens", type=int, default=32768, help="calibration token budget (both schemes)")
    q.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048], help="MaCa sequence lengths")
    q.add_argument("--seq-len", type=int, default=2048, help="fixed-scheme sequence length")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--weighting", default=None, choices=("sequence", "token"),
                   help="Hessian weighting: each sequence one sample (MaCa) or each token (classic GPTQ); default: "
                        "sequence with --calib maca, token with --calib fixed")
    q.add_argument("--act-order", action="store_true")
    q.add_argument("--sym", action="store_true")
    q.add_argument("--static-groups", action="store_true",
                   help="with --act-order: group parameters fixed before the sweep, in column order")
    q.add_argument("--damp", type=float, default=0.01, help="dampening, a fraction of mean(diag H)")
    q.add_argument("--reg", type=_reg, default="auto",
                   help="saliency regularisation λ (adds λ·diag(H) to H; 0: none, the classic GPTQ), or auto: the "
                        "λ the study chose for the bit width (README Results)")
    q.add_argument("--alpha", type=float, default=0.25, help="GPTAQ: weight of the cross term")
    q.add_argument("--mse", action="store_true", help="grid-search each group's range for the least squared error")
    q.add_argument("--block-size", type=int, default=128, help="columns per lazy block update")
    q.add_argument("--checkpoint-format", default="gptq", choices=("gptq", "gptq_v2"),
                   help="zero points stored minus one (gptq, what most readers take) or as they are (gptq_v2)")
    q.add_argument("--max-batch-tokens", type=int, default=16384,
                   help="calibration tokens per forward micro-batch")
    q.add_argument("--overrides", default=None, metavar="FILE",
                   help="JSON or YAML file mapping module name patterns to other settings, e.g. "
                        '{"down_proj": {"bits": 8}, "model.layers.0": {"group_size": 32}}')
    q.add_argument("--device", default=None, help="where each layer runs while quantized (e.g. cuda)")
    q.add_argument("--resume", default=None, help="folder for per-layer state; a rerun continues there")
    q.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"),
                   help="the model's dtype while quantized, in memory one layer at a time (auto: the checkpoint's; "
                        "float32 by default: 16-bit matmuls are slow on most CPUs)")
    q.add_argument("--calib-shards", type=int, default=8,
                   help="virtual shards of the calibration set, the unit of data parallelism under torchrun: the "
                        "checkpoint depends on them, not on the number of ranks")
    q.add_argument("--moe-calibration", default="routed", choices=("routed", "all"),
                   help="MoE experts' Hessians: from the tokens routed to each (blended with every token's below "
                        "--moe-min-tokens), or from every token")
    q.add_argument("--moe-min-tokens", type=int, default=128,
                   help="routed tokens below which an expert's Hessian is blended with every token's")
    q.add_argument("--activations", default="auto", choices=("auto", "device", "host"),
                   help="where calibration inputs wait between layers: on the device, in pinned host memory (for "
                        "GPUs too small to hold them), or auto (the device while they take at most a quarter of it)")
    q.add_argument("--timeout", type=float, default=1800,
                   help="under torchrun: seconds a collective waits for a rank that stopped before this one fails")
    q.add_argument("--keep-float", nargs="+", default=[], metavar="NAME",
                   help="parameters or modules to leave in float (e.g. experts: fused MoE experts are not quantized "
                        "yet); any other floating matrix that is not a quantized Linear is refused")

    e = sub.add_parser("eval", help="perplexity of a model on a text at several evaluation lengths")
    e.add_argument("--model", required=True, help="a quantized checkpoint folder, a model folder, or 'demo'")
    e.add_argument("--text", required=True, help="text file (plain or .gz)")
    e.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    e.add_argument("--max-tokens", type=int, default=None, help="tokens used per length (whole windows)")

    b = sub.add_parser("bench", help="run the benchmarks of a source checkout (benchmarks/run.py)")
    b.add_argument("args", nargs=argparse.REMAINDER)

    d = sub.add_parser("demo", help="the main job on the embedded default: fixed vs MaCa vs RTN vs FP, 4-bit")
    d.add_argument("--out", default="demo_out")
    d.add_argument("--calib-tokens", type=int, default=8192)
    d.add_argument("--eval-tokens", type=int, default=2048, help="tokens per text and evaluation length")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-install", action="store_true", help="fail instead of installing missing packages")

    st = sub.add_parser("study", help="the MaCa study on the embedded default (resumable; one JSON per run)")
    st.add_argument("--out", default="study")
    st.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs (then summarize)")
    st.add_argument("--summarize-only", action="store_true", help="only rebuild the table and plots")
    st.add_argument("--sensitivity", action="store_true",
                    help="instead: how far GPTQ moves when only its Hessians' summation order changes "
                         "(<out>/sensitivity.json)")
    st.add_argument("--rerun", action="append", default=[], metavar="PATTERN",
                    help="rerun the finished runs whose key matches PATTERN (fnmatch, e.g. '*-reg0.5-s0'; repeatable) "
                         "and that were made with other code than this commit")
    return p


def _reg(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number, got {text!r}") from None


def _load_tokenizer(path: str, required: bool):
    """The folder's tokenizer; None where it has none and none is needed (RTN reads no text)."""
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises several types, with messages of several lines
        files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        reason = (_one_line(exc) if any(os.path.exists(os.path.join(path, f)) for f in files)
                  else f"none of {', '.join(files)}")
        if required:
            raise UsageError(f"--model {path}: no usable tokenizer in the folder ({reason})") from None
        print(f"maca-kernels: note: no usable tokenizer in {path}; the checkpoint is written without one",
              file=sys.stderr)
        return None


def _check_model_path(path: str) -> None:
    if path != "demo" and not os.path.isdir(path):
        raise UsageError(f"--model {path}: no such folder")


def _load_model(path: str, need_tokenizer: bool = True):
    """(model, tokenizer) from a folder (a GPTQ checkpoint of ours or a plain model) or 'demo'."""
    if path == "demo":
        from . import embedded

        return embedded.load_model()
    import json

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise UsageError(f"--model {path}: no config.json (not a Hugging Face model folder)")
    with open(cfg_path) as f:
        cfg = json.load(f)
    tokenizer = _load_tokenizer(path, need_tokenizer)
    if "quantization_config" in cfg:
        import torch

        from .checkpoint import load_quantized

        return load_quantized(path, dtype=torch.float32), tokenizer
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except ValueError as exc:
        raise UsageError(f"--model {path}: unsupported architecture ({exc})") from None
    return model.eval(), tokenizer


def _read_text(path: str | None, default_demo: bool) -> str:
    """The text of --text (read before the model loads: a bad file fails at once), or the demo's."""
    from . import calibration

    if path is None:
        if not default_demo:
            raise UsageError("--text is required (a plain or .gz text file)")
        from . import embedded

        return embedded.jargon_text()
    _check_text(path)
    return calibration.read_text(path)


def _check_text(path: str) -> None:
    if os.path.isdir(path):
        raise UsageError(f"--text {path}: is a folder, expected a text file (plain or .gz)")
    if not os.path.isfile(path):
        raise UsageError(f"--text {path}: no such file")


def _check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device}: not a device (expected e.g. cpu, cuda, cuda:1)") from None
    backend = getattr(torch, dev.type, None) if dev.type != "cpu" else None
    if dev.type != "cpu" and not (backend is not None and hasattr(backend, "is_available") and backend.is_available()):
        raise UsageError(f"--device {device}: no {dev.type} device is available to this torch ({torch.__version__})")
    if dev.index is not None and hasattr(backend, "device_count") and dev.index >= backend.device_count():
        raise UsageError(f"--device {device}: this machine has {backend.device_count()} {dev.type} device(s)")


def _quantize(a) -> None:
    """A model folder goes disk to disk (pipeline/streamed.py: one decoder layer in memory at a time); the
    embedded demo model is loaded and quantized in memory. Under torchrun every rank runs this with the same
    arguments (one process group; each rank on its own GPU when the layers run on CUDA); rank 0 writes."""
    import torch

    from .pipeline.world import World, init_from_env

    if a.group_size != -1 and a.group_size <= 0:
        raise UsageError(f"--group-size must be a positive divisor of the hidden sizes or -1, got {a.group_size}")
    if a.moe_min_tokens < 0:
        raise UsageError(f"--moe-min-tokens must be an int >= 0, got {a.moe_min_tokens}")
    if a.calib_shards <= 0:
        raise UsageError(f"--calib-shards must be a positive int, got {a.calib_shards}")
    if a.timeout <= 0:
        raise UsageError(f"--timeout must be positive seconds, got {a.timeout}")
    a.overrides = _read_overrides(a.overrides)
    from .pipeline.run import check_settings

    try:  # every setting checked before the model loads, with quantize_model's own rules and words
        check_settings(dict(damp=a.damp, reg=a.reg, alpha=a.alpha, block_size=a.block_size, mse=a.mse,
                            static_groups=a.static_groups, overrides=a.overrides, max_batch_tokens=a.max_batch_tokens),
                       flag=lambda k: "--" + k.replace("_", "-"))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    started = init_from_env(a.device, a.timeout)
    try:
        _quantize_ranked(a, World())
        if started:  # every rank stays until rank 0 has written: no connection torn down while a peer still works
            torch.distributed.barrier()
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _quantize_ranked(a, world) -> None:
    import torch

    from . import calibration
    from .checkpoint import check_out_dir, save_quantized
    from .pipeline import decoder_layers, quantize_model

    if world.size > 1 and a.device == "cuda":
        a.device = f"cuda:{torch.cuda.current_device()}"
    # everything that can be checked before the model loads and the run starts
    if world.rank == 0:  # (the only rank that writes)
        try:
            check_out_dir(a.out, a.overwrite)
        except FileExistsError as exc:
            raise UsageError(f"--out: {exc}") from None
    _check_device(a.device)
    _check_model_path(a.model)
    text = None if a.method == "rtn" else _read_text(a.text, a.model == "demo")
    in_memory = a.model == "demo"
    if not in_memory:
        from .pipeline.streamed import unstreamable

        model = _skeleton(a.model)  # refuses a quantized or unsupported model first
        reason = unstreamable(a.model)
        if reason:
            print(f"maca-kernels quantize: loading the whole model ({reason}; transformers converts them)",
                  file=sys.stderr)
            in_memory = True
    if in_memory:
        model, tokenizer = _load_model(a.model, need_tokenizer=a.method != "rtn")
    else:
        tokenizer = _load_tokenizer(a.model, a.method != "rtn")
    try:
        _, layers = decoder_layers(model)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for name, m in layers.named_modules():
        if isinstance(m, torch.nn.Linear) and a.group_size != -1 and m.in_features % a.group_size:
            raise UsageError(f"--group-size {a.group_size} does not divide in_features = {m.in_features} of {name}")
    calib = None
    if a.method != "rtn":
        ids = calibration.load_token_ids(text=text, tokenizer=tokenizer)
        calib_ids, _ = calibration.holdout_split(ids, eval_fraction=0.1)
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if a.calib == "maca":
            calib = calibration.matryoshka(calib_ids, a.lengths, total_tokens=a.calib_tokens, seed=a.seed,
                                           max_positions=max_pos)
        else:
            calib = calibration.fixed(calib_ids, a.seq_len, total_tokens=a.calib_tokens, seed=a.seed,
                                      max_positions=max_pos)
    _steady_heap()
    options = dict(method=a.method, weighting=a.weighting or ("sequence" if a.calib == "maca" else "token"),
                   sym=a.sym, act_order=a.act_order, static_groups=a.static_groups, damp=a.damp, reg=a.reg,
                   alpha=a.alpha, mse=a.mse, block_size=a.block_size, overrides=a.overrides,
                   checkpoint_format=a.checkpoint_format, max_batch_tokens=a.max_batch_tokens, device=a.device,
                   resume_dir=a.resume, keep_float=a.keep_float, calib_shards=a.calib_shards,
                   activations=a.activations, moe_calibration=a.moe_calibration, moe_min_tokens=a.moe_min_tokens)
    if in_memory:
        quantize_model(model, calib, a.bits, a.group_size, **options)
        if world.rank != 0:
            return
        out = save_quantized(model, a.out, tokenizer=tokenizer, overwrite=a.overwrite)
    else:
        from .pipeline.streamed import quantize_folder

        dtype = None if a.dtype == "auto" else getattr(torch, a.dtype)
        out = quantize_folder(a.model, a.out, calib, a.bits, a.group_size, dtype=dtype, tokenizer=tokenizer,
                              overwrite=a.overwrite, **options)
    if world.rank == 0:
        print(f"wrote {out}")


def _steady_heap() -> None:
    """glibc: every allocation above 128 KB its own mapping, given back when freed. By default the threshold rises
    after the first large free, and layer after layer of freed tensors fragments the heap instead (+18 to +187 MB
    for 6 more layers of a hidden-2048 Llama; +1 MB with this, README). The CLI is its own process: set it there."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _skeleton(path: str):
    """The model of a folder on the meta device (its structure, no weights), for the checks before a run."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "quantization_config", None) is not None:
            raise UsageError(f"--model {path}: already quantized (config.json has quantization_config)")
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as exc:
        raise UsageError(f"--model {path}: unsupported architecture ({exc})") from None


def _eval(a) -> None:
    from . import calibration
    from .evaluate import perplexity

    _check_model_path(a.model)
    text = _read_text(a.text, False)
    model, tokenizer = _load_model(a.model)
    ids = calibration.load_token_ids(text=text, tokenizer=tokenizer)
    for L in a.lengths:
        print(f"perplexity @{L}: {perplexity(model, ids, L, max_tokens=a.max_tokens, progress=True):.3f}")


def _bench(a) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "benchmarks", "run.py")):
        raise UsageError("bench runs the benchmarks of a source checkout; none found beside this package")
    import runpy

    sys.path.insert(0, root)
    sys.argv = ["benchmarks.run", *a.args]
    runpy.run_module("benchmarks.run", run_name="__main__")


def _demo(a) -> None:
    from .demo import run_demo

    run_demo(a.out, calib_tokens=a.calib_tokens, eval_tokens=a.eval_tokens, seed=a.seed, install=not a.no_install)


def _study(a) -> None:
    from .study import run_study, sensitivity, summarize

    if a.rerun and (a.sensitivity or a.summarize_only):
        raise UsageError("--rerun reruns study runs: it cannot be combined with --sensitivity or --summarize-only")
    if a.sensitivity:
        sensitivity(a.out)
    elif a.summarize_only:
        summarize(a.out)
    else:
        run_study(a.out, max_runs=a.max_runs, rerun=tuple(a.rerun))


def _read_overrides(path: str | None) -> dict | None:
    """--overrides FILE: a JSON or YAML mapping (YAML when the name ends in .yaml / .yml)."""
    if path is None:
        return None
    if not os.path.isfile(path):
        raise UsageError(f"--overrides: no such file: {path}")
    with open(path) as f:
        text = f.read()
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error is the user's file
        raise UsageError(f"--overrides: {path} is not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'}"
                         f": {_one_line(exc)}") from None
    return data


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


COMMANDS = {"quantize": _quantize, "eval": _eval, "bench": _bench, "demo": _demo, "study": _study}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # bad flags: argparse prints usage and exits with 2
    try:
        COMMANDS[args.command](args)
    except (UsageError, ValueError, FileNotFoundError, FileExistsError) as exc:  # inputs refused (text too short, ...)
        print(f"maca-kernels {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"maca-kernels {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a failed run: one line, the type and the reason
        print(f"maca-kernels {args.command}: failed: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
