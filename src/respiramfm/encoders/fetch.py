"""``respiramfm fetch-opera``: the only place that downloads the released OPERA-CT weights.

Nothing else in respiramfm touches the network: this command is run explicitly, once. It downloads
``encoder-operaCT.ckpt`` from the Hugging Face repository ``evelyn0414/OPERA`` with huggingface_hub,
checks its size and sha256 against the values recorded for the pinned revision (docs/paper.md §3),
and converts it into ``encoder-operaCT.safetensors`` beside it: the HTS-AT entries only (prefix
``encoder.encoder.htsat.`` stripped, front-end blocks kept for completeness), after proving that they
load strictly into our encoder. Loading the safetensors file later needs no pickle at all.

``--checkpoint PATH`` converts a file obtained some other way (no download; the hash is reported and
compared with the known one but a mismatch is not an error, since it may be a different revision).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from respiramfm.encoders.checkpoint import load_state_dict
from respiramfm.models.opera_ct import HTSAT_PREFIX, from_checkpoint, htsat_keys
from respiramfm.errors import CheckpointError
from respiramfm.utils.io import atomic_save_safetensors, sha256_file

HF_REPO = "evelyn0414/OPERA"
HF_FILENAME = "encoder-operaCT.ckpt"
KNOWN_REVISION = "d8de4322870b596f0a6ff6ea907b9a6996cd243a"
# revision -> (size in bytes, sha256) of HF_FILENAME, as reported in docs/paper.md §3 (unverified there).
KNOWN_FILES = {KNOWN_REVISION: (355_598_886, "83c35b435518ad5f395bf4d34e552caa088faf9e63f6b8058d5288e9abb350ae")}
CONVERTED_NAME = "encoder-operaCT.safetensors"
_TRUE = {"1", "true", "yes", "on"}


def download(out_dir: Path, revision: str) -> Path:
    """Download the checkpoint into ``out_dir``; a clear CheckpointError when the hub is unreachable."""
    target = out_dir / HF_FILENAME
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            raise CheckpointError(f"{var} is set, so the OPERA-CT checkpoint cannot be downloaded; unset it "
                                  f"and retry with network access, or download {HF_FILENAME} from "
                                  f"huggingface.co/{HF_REPO} yourself and pass --checkpoint", target)
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(HF_REPO, HF_FILENAME, revision=revision, local_dir=out_dir))
    except Exception as exc:  # network, authentication, missing revision...: all reported the same way
        raise CheckpointError(f"download of {HF_REPO}/{HF_FILENAME}@{revision} failed "
                              f"({type(exc).__name__}: {exc}); fetch-opera needs network access to "
                              f"huggingface.co", target) from None


def verify(path: Path, revision: str | None, required: bool) -> dict:
    """Compare size and sha256 with the known values for ``revision``; raise on mismatch if ``required``."""
    size, digest = path.stat().st_size, sha256_file(path)
    known = KNOWN_FILES.get(revision or "")
    info = {"size": size, "sha256": digest, "verified": None}
    if known is None:
        return info  # unknown revision: nothing to compare with
    info["verified"] = (size, digest) == known
    if required and not info["verified"]:
        raise CheckpointError(f"downloaded file does not match revision {revision}: size {size} "
                              f"(expected {known[0]}), sha256 {digest} (expected {known[1]}); "
                              f"not converting", path)
    return info


def convert(src: Path, dst: Path) -> dict:
    """Write the HTS-AT entries of ``src`` to ``dst`` (safetensors) after a strict load proves them."""
    state = load_state_dict(src)
    prefixed = {k[len(HTSAT_PREFIX):]: v for k, v in state.items() if k.startswith(HTSAT_PREFIX)}
    if not prefixed:
        raise CheckpointError(f"no {HTSAT_PREFIX!r} keys: not an OPERA-CT Lightning checkpoint", src)
    htsat_keys(state, src)  # rejects stray keys outside the prefix and the known COLA head
    encoder = from_checkpoint(prefixed)  # strict: raises CheckpointError listing any bad key
    metadata = {"format": "respiramfm-htsat", "source": src.name, "source_sha256": sha256_file(src),
                "weights_sha256": encoder.weights_sha256, "stripped_prefix": HTSAT_PREFIX}
    atomic_save_safetensors(dst, prefixed, metadata)
    return {"keys": len(prefixed), "weights_sha256": encoder.weights_sha256, "embed_dim": encoder.embed_dim,
            "out_dim": encoder.out_dim}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="directory for the checkpoint and its conversion")
    parser.add_argument("--revision", default=KNOWN_REVISION,
                        help=f"Hugging Face revision of {HF_REPO} (default: {KNOWN_REVISION[:12]}, "
                             "whose size and sha256 are recorded and checked)")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="convert this local checkpoint instead of downloading one")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.checkpoint is not None:
        src = Path(args.checkpoint)
        if not src.is_file():
            raise CheckpointError("checkpoint file not found", src)
        check = verify(src, KNOWN_REVISION, required=False)
    else:
        src = download(out, args.revision)
        check = verify(src, args.revision, required=True)
    dst = out / CONVERTED_NAME
    summary = {"checkpoint": str(src), **check, "safetensors": str(dst), **convert(src, dst)}
    print(json.dumps(summary))
    return 0
