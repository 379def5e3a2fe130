"""A small real stage-1 input built once per session: simulated cohort -> audio store -> text store.

Everything goes through the project's own tools (``simulate_cohort``, ``embed_manifest`` with the
non-learned ``logmel-stats`` encoder, the text store with a tiny real-architecture LLM), so the
alignment tests read the same on-disk formats ``respiramfm align`` reads in production.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from respiramfm.align.data import pairset_from_arrays


@dataclass
class SimStores:
    manifest: Path
    audio_store: Path
    text_store: Path
    audio_dim: int
    text_dim: int


@pytest.fixture(scope="session")
def sim_stores(tmp_path_factory) -> SimStores:
    from respiramfm.data.simulate import SimConfig, simulate_cohort
    from respiramfm.encoders.store import embed_manifest
    from respiramfm.llm.backbones import tiny_backbone
    from respiramfm.llm.text_store import embed_manifest as embed_text_manifest

    root = tmp_path_factory.mktemp("align_sim")
    sim = SimConfig(seed=0, quick=True, n_patients=12, datasets=("sim_covid_phone",), recordings_per_patient=2,
                    clip_seconds=(1.0, 1.5))
    manifest = simulate_cohort(root / "cohort", sim)
    meta = embed_manifest(manifest, root / "audio_store", encoder="logmel-stats", progress=False)
    embed_text_manifest(manifest, root / "text_store", tiny_backbone(hidden_size=32, seed=0))
    return SimStores(manifest, root / "audio_store", root / "text_store", int(meta["dim"]), 32)


def linear_pairs(n: int, d_text: int = 32, d_audio: int = 48, noise: float = 0.5, seed: int = 0, offset: int = 0):
    """Audio = fixed random linear map of text + Gaussian noise (the map is shared across calls)."""
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(1234).normal(size=(d_text, d_audio)) / np.sqrt(d_text)
    text = rng.normal(size=(n, d_text)).astype(np.float32)
    audio = (text @ w + noise * rng.normal(size=(n, d_audio))).astype(np.float32)
    ids = [f"r{offset + i}" for i in range(n)]
    return pairset_from_arrays(audio, text, record_ids=ids, patient_ids=ids, diagnoses=[str(i % 3) for i in range(n)])


@pytest.fixture(scope="session")
def make_pairs():
    """The :func:`linear_pairs` factory (test modules cannot import conftest directly)."""
    return linear_pairs
