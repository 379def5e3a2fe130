"""What a stage-1 projector was aligned with, and the check that stage 2 (and prediction) uses it with the same.

A projector maps one audio encoder's embeddings into one LLM's text space. Two encoders (or
two LLMs, or one LLM cut at two depths) of the same width give tensors of the same shape, so a
wrong projector loads without complaint and silently produces nonsense. ``align`` therefore
records, in ``projector.json``'s provenance under ``"compat"`` (:func:`projector_compat`):

* ``encoder``: name, weights content hash, checkpoint path (informative), width, front-end key;
* ``llm``: the text store's backbone identity (name, architecture, weights and tokenizer
  digests, dtype), its layer cut (``layers``: ``"first N of M"`` or ``"all"``; ``num_layers``:
  N or 0) and hidden size;
* ``text``: the text space, max tokens and the text store's key.

:func:`check_projector` compares a projector's record with the stage-2 side (the audio store's
meta and the loaded backbone) and raises :class:`ProjectorMismatchError` naming both sides of
every difference. The saved model carries the projector's provenance unchanged
(``config.json`` -> ``projector.provenance``), so prediction can run the same check against
its own encoder and backbone. Projectors written before this record existed carry only the
flat keys (``audio_encoder``, ``audio_weights_hash``, ``text_model``); those are read too, and a
field absent on either side is not compared.
"""

from __future__ import annotations

import re

from respiramfm.errors import ConfigError

ENCODER_KEYS = ("name", "weights_hash", "dim", "frontend_key")   # compared
LLM_KEYS = ("arch", "weights", "tokenizer", "layers", "hidden_size")  # compared


class ProjectorMismatchError(ConfigError):
    """A projector aligned with another audio encoder, LLM or layer cut than the one it is used with."""

    def __init__(self, message: str, differences: list[tuple[str, object, object]], path=None):
        self.differences = list(differences)
        super().__init__(message, path=path)


def _num_layers(layers: str) -> int:
    m = re.match(r"first (\d+) of \d+", layers or "")
    return int(m.group(1)) if m else 0


def encoder_record(audio_meta: dict) -> dict:
    """The encoder facts of an audio store's meta (``respiramfm embed`` output)."""
    m = audio_meta or {}
    return {"name": m.get("encoder"), "weights_hash": m.get("weights_hash"), "checkpoint": m.get("checkpoint"),
            "dim": m.get("dim"), "frontend_key": m.get("frontend_key"), "kind": m.get("kind")}


def llm_record(identity: dict, hidden_size) -> dict:
    """The LLM facts of a backbone identity (:meth:`Backbone.identity`) and its hidden size."""
    ident = dict(identity or {})
    layers = ident.get("layers") or "all"
    return {"name": ident.get("name"), "revision": ident.get("revision"), "arch": ident.get("arch"),
            "weights": ident.get("weights"), "tokenizer": ident.get("tokenizer"), "dtype": ident.get("dtype"),
            "layers": layers, "num_layers": _num_layers(layers), "hidden_size": hidden_size}


def projector_compat(audio_meta: dict, text_meta: dict) -> dict:
    """The ``compat`` record of a projector aligned on these audio and text stores."""
    t = text_meta or {}
    backbone = t.get("backbone") if isinstance(t.get("backbone"), dict) else {}
    return {"encoder": encoder_record(audio_meta), "llm": llm_record(backbone, t.get("dim")),
            "text": {"space": t.get("space"), "max_tokens": t.get("max_tokens"), "store_key": t.get("key")}}


def recorded(provenance: dict) -> dict:
    """The compat record of a projector's provenance, rebuilt from the older flat keys when absent."""
    p = provenance or {}
    if isinstance(p.get("compat"), dict):
        return p["compat"]
    model = p.get("text_model") if isinstance(p.get("text_model"), dict) else {}
    return {"encoder": {"name": p.get("audio_encoder"), "weights_hash": p.get("audio_weights_hash"),
                        "frontend_key": p.get("audio_frontend_key")},
            "llm": llm_record(model, None) if model else {}, "text": {"space": p.get("text_space")}}


def _differences(part: str, keys, projector: dict, used: dict) -> list[tuple[str, object, object]]:
    out = []
    for k in keys:
        a, b = (projector or {}).get(k), (used or {}).get(k)
        if a in (None, "") or b in (None, ""):
            continue
        if str(a) != str(b):
            out.append((f"{part}.{k}", a, b))
    return out


def check_projector(provenance: dict, audio_meta: dict | None, backbone_identity: dict | None,
                    hidden_size=None, path=None, used_with: str = "stage 2") -> None:
    """Refuse a projector whose recorded encoder or LLM differs from the ones it is used with.

    ``audio_meta``: the audio store's meta (or None to skip the encoder side); ``backbone_identity``
    and ``hidden_size``: the LLM it will feed (or None to skip the LLM side).
    """
    rec = recorded(provenance)
    diffs = []
    if audio_meta is not None:
        diffs += _differences("encoder", ENCODER_KEYS, rec.get("encoder"), encoder_record(audio_meta))
    if backbone_identity is not None:
        diffs += _differences("llm", LLM_KEYS, rec.get("llm"), llm_record(backbone_identity, hidden_size))
    if diffs:
        shown = "; ".join(f"{k}: projector {a!r} vs {used_with} {b!r}" for k, a, b in diffs)
        raise ProjectorMismatchError(
            f"the projector was aligned with a different audio encoder or LLM than {used_with} uses ({shown}); "
            "re-run `respiramfm align` on embeddings and text targets of this encoder and LLM (same layer cut)",
            diffs, path=path)


__all__ = ["ProjectorMismatchError", "check_projector", "encoder_record", "llm_record",
           "projector_compat", "recorded"]
