"""Model configs: importable without torch, bounded against tampered values, and what the modules are built from."""

from __future__ import annotations

import subprocess
import sys

import pytest

from respiramfm.config import from_dict
from respiramfm.errors import ConfigError
from respiramfm.models.configuration import EncoderInfo, FusionConfig, HTSATConfig, LoraSettings, ProjectorConfig


def test_configs_import_without_torch():
    code = ("import sys, respiramfm.models, respiramfm.models.configuration as c; "
            "c.FusionConfig().validate(); c.ProjectorConfig(out_dim=8).validate(); "
            "print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_htsat_is_built_from_its_config():
    from respiramfm.models.htsat import HTSAT

    cfg = HTSATConfig(embed_dim=8, depths=(1, 1), num_heads=(1, 2), num_classes=3, drop_path_rate=0.0)
    model = HTSAT.from_config(cfg)
    assert model.config == cfg
    again = HTSAT(embed_dim=8, depths=(1, 1), num_heads=(1, 2), num_classes=3, drop_path_rate=0.0)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in again.state_dict().items()}


@pytest.mark.parametrize("changes, words", [
    ({"n_audio_tokens": 10 ** 9}, "n_audio_tokens"),
    ({"max_context_tokens": 10 ** 9}, "max_context_tokens"),
    ({"num_layers": 10 ** 6}, "num_layers"),
    ({"tiny": {"hidden_size": 10 ** 6}}, "fusion.tiny.hidden_size"),
    ({"tiny": {"vocab_size": 10 ** 9}}, "fusion.tiny.vocab_size"),
    ({"tiny": {"layers": [1, 2]}}, "fusion.tiny.layers"),
    ({"attn_implementation": "evil"}, "attn_implementation"),
    ({"order": ["prompt", "audio", "audio"]}, "fusion.order"),
    ({"lora": LoraSettings(r=10 ** 6)}, "lora.r"),
    ({"encoder": EncoderInfo(frontend={"n_fft": 10 ** 9})}, "n_fft"),
    ({"encoder": EncoderInfo(frontend={"evil": 1})}, "unknown key"),
    ({"encoder": EncoderInfo(out_dim=10 ** 7)}, "encoder.out_dim"),
])
def test_fusion_config_bounds(changes, words):
    with pytest.raises(ConfigError, match=words):
        FusionConfig(**changes).validate()


def test_valid_configs_pass_and_load_from_dicts():
    cfg = from_dict(FusionConfig, {"backbone": "tiny-llama", "tiny": {"hidden_size": 64, "resid_pdrop": 0.0},
                                   "encoder": {"frontend": {"sr": 16000, "input_sec": 8.0}}}).validate()
    assert cfg.encoder.frontend_config().input_sec == 8.0
    with pytest.raises(ConfigError, match="hidden"):
        ProjectorConfig(hidden=10 ** 6, out_dim=8).validate()
