"""Configuration dataclasses of every model in :mod:`respiramfm.models`, importable without torch.

Each class fixes a model's shape; the modules that build the nn.Modules live next door
(``htsat``, ``projector``, ``lora``, ``fusion``). Keeping the configs here means a YAML file,
a saved ``config.json`` or a CLI ``--set`` override can be checked before torch, PEFT or
transformers are imported, and that a saved model directory is validated against these
dataclasses (:mod:`respiramfm.models.saved`) before any tensor is read.

Limits such as :data:`MAX_AUDIO_TOKENS` are sanity bounds against tampered or mistyped
configs (a huge value would allocate memory before any check could fail), not modelling
choices: real models sit far below them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from respiramfm.config import from_dict
from respiramfm.data.templates import STYLES
from respiramfm.errors import ConfigError

# ------------------------------------------------------------------ sanity bounds
MAX_AUDIO_TOKENS = 1024        # the OPERA-CT token grid is 64; a few hundred covers any encoder we know
MAX_DIM = 65536                # any embedding / hidden width
MAX_CONTEXT_TOKENS = 8192
MAX_LORA_RANK = 4096
MAX_LAYERS = 1024
# The tiny_backbone arguments a config may set (tests and demos), with upper bounds that keep a
# tampered config from allocating gigabytes for a "tiny" model.
TINY_LIMITS = {"hidden_size": 4096, "num_layers": 64, "heads": 64, "kv_heads": 64, "intermediate_size": 16384,
               "max_positions": 8192}
TINY_MAX_INT = 16384  # any other integer override of the tiny config (e.g. a config field of the architecture)
ATTN_IMPLEMENTATIONS = (None, "eager", "sdpa", "flash_attention_2", "flex_attention")

# ------------------------------------------------------------------ stage-2 input layout
SEGMENTS = ("prompt", "context", "audio")
MODES = ("multimodal", "audio_only", "text_only")
AUDIO_SCALES = ("none", "embedding_rms")

# ------------------------------------------------------------------ projector
PROJECTOR_KINDS = ("mlp", "linear")
PROJECTOR_FINALS = ("official", "layernorm", "none")


def _positive_int(value, name: str, upper: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if upper is not None and value > upper:
        raise ConfigError(f"{name} is {value}, above the limit of {upper}")


def _check_fraction(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must lie in [0, 1), got {value!r}")


@dataclass
class HTSATConfig:
    """Sizes of the HTS-AT backbone (defaults: OPERA-CT's released encoder)."""

    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: int = 8
    spec_size: int = 256
    patch_size: int = 4
    mel_bins: int = 64
    drop_path_rate: float = 0.1
    num_classes: int = 527
    fused: bool = True


@dataclass
class ProjectorConfig:
    """Shape of the stage-1 projector. ``in_dim=None`` / ``out_dim=None`` mean "the audio / text store's width"
    (``respiramfm align`` fills them in from the stores it reads)."""

    kind: str = "mlp"
    in_dim: int | None = 768
    hidden: int = 1024
    out_dim: int | None = None
    dropout: float = 0.1
    final: str = "layernorm"   # signed head: measured better than "official" (see configs/align.yaml)

    def validate(self) -> "ProjectorConfig":
        if self.kind not in PROJECTOR_KINDS:
            raise ConfigError(f"projector.kind must be one of {PROJECTOR_KINDS}, got {self.kind!r}")
        if self.final not in PROJECTOR_FINALS:
            raise ConfigError(f"projector.final must be one of {PROJECTOR_FINALS}, got {self.final!r}")
        dims = {"hidden": self.hidden}
        if self.in_dim is not None:
            dims["in_dim"] = self.in_dim
        if self.out_dim is not None:
            dims["out_dim"] = self.out_dim
        for name, v in dims.items():
            _positive_int(v, f"projector.{name}", MAX_DIM)
        _check_fraction(self.dropout, "projector.dropout")
        return self


@dataclass
class LoraSettings:
    """LoRA hyper-parameters (paper: r 16, alpha 32, dropout 0.1)."""

    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    mlp: bool = False  # also adapt the MLP projections
    target_modules: list[str] | None = None  # explicit override of the per-architecture defaults
    extra: dict = field(default_factory=dict)  # further peft.LoraConfig keyword arguments
    top_layers: int = 0  # placement: 0 = every decoder layer (the paper); k > 0 = only the top k layers

    def validate(self) -> "LoraSettings":
        if self.r <= 0 or self.alpha <= 0:
            raise ConfigError(f"lora.r and lora.alpha must be positive, got r={self.r}, alpha={self.alpha}")
        _positive_int(self.r, "lora.r", MAX_LORA_RANK)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must lie in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not all(isinstance(t, str) and t for t in self.target_modules):
            raise ConfigError(f"lora.target_modules must be a list of module names, got {self.target_modules!r}")
        if not all(isinstance(k, str) for k in self.extra):
            raise ConfigError("lora.extra keys must be strings")
        if isinstance(self.top_layers, bool) or not isinstance(self.top_layers, int) or self.top_layers < 0:
            raise ConfigError(f"lora.top_layers must be an int >= 0 (0 = every layer), got {self.top_layers!r}")
        return self


@dataclass
class EncoderInfo:
    """The audio encoder whose embeddings the model was trained on (used by prediction)."""

    name: str = "opera-ct"
    checkpoint: str = ""
    weights_hash: str = ""
    out_dim: int = 768
    frontend: dict = field(default_factory=dict)  # dataclasses.asdict(FrontendConfig); {} = the encoder's own
    tokens: bool = False                          # embeddings are the token grid (n_audio_tokens > 1)

    def validate(self) -> "EncoderInfo":
        _positive_int(self.out_dim, "encoder.out_dim", MAX_DIM)
        if not isinstance(self.frontend, dict):
            raise ConfigError(f"encoder.frontend must be a mapping, got {type(self.frontend).__name__}")
        if self.frontend:
            self.frontend_config()
        return self

    def frontend_config(self):
        """The recorded front end as a checked ``FrontendConfig`` (unknown keys, ranges and sizes refused)."""
        # Lazy: the audio package imports librosa and PyAV, which a config check must not pay for.
        from respiramfm.audio.frontend import FrontendConfig

        return from_dict(FrontendConfig, self.frontend, where="encoder.frontend")


@dataclass
class FusionConfig:
    """Everything that fixes the stage-2 model's shape and input layout."""

    backbone: str = "smollm2-135m"
    revision: str | None = None
    dtype: str = "float32"
    num_layers: int = 0                            # > 0: keep only the LLM's first N decoder layers (CPU demo)
    tiny: dict = field(default_factory=dict)       # tiny_backbone kwargs for backbone "tiny-<arch>"
    order: list[str] = field(default_factory=lambda: list(SEGMENTS))
    n_audio_tokens: int = 1
    mode: str = "multimodal"
    prompt_style: str = "respiramfm"
    max_context_tokens: int = 125
    padding_side: str = "right"
    audio_scale: str = "none"
    lora: LoraSettings = field(default_factory=LoraSettings)
    head_bias: bool = True
    attn_implementation: str | None = None
    encoder: EncoderInfo = field(default_factory=EncoderInfo)

    def validate(self) -> "FusionConfig":
        if not isinstance(self.order, list) or sorted(map(str, self.order)) != sorted(SEGMENTS):
            raise ConfigError(f"fusion.order must be a permutation of {list(SEGMENTS)}, got {self.order}")
        if self.mode not in MODES:
            raise ConfigError(f"fusion.mode must be one of {MODES}, got {self.mode!r}")
        if self.n_audio_tokens < 1:
            raise ConfigError(f"fusion.n_audio_tokens must be >= 1, got {self.n_audio_tokens}")
        _positive_int(self.n_audio_tokens, "fusion.n_audio_tokens", MAX_AUDIO_TOKENS)
        if self.num_layers < 0 or self.num_layers > MAX_LAYERS:
            raise ConfigError(f"fusion.num_layers must be >= 0 (0 = every layer), got {self.num_layers}")
        if self.max_context_tokens < 1:
            raise ConfigError(f"fusion.max_context_tokens must be >= 1, got {self.max_context_tokens}")
        _positive_int(self.max_context_tokens, "fusion.max_context_tokens", MAX_CONTEXT_TOKENS)
        if self.padding_side not in ("left", "right"):
            raise ConfigError(f"fusion.padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.audio_scale not in AUDIO_SCALES:
            raise ConfigError(f"fusion.audio_scale must be one of {AUDIO_SCALES}, got {self.audio_scale!r}")
        if not isinstance(self.tiny, dict) or not all(isinstance(k, str) and k.isidentifier() for k in self.tiny):
            raise ConfigError(f"fusion.tiny must map tiny_backbone argument names to values, got {self.tiny!r}"[:300])
        for key, value in self.tiny.items():
            if key in ("seed", "attn_implementation"):
                continue
            if isinstance(value, int) and not isinstance(value, bool):  # sizes: bounded (see TINY_LIMITS)
                if value > TINY_LIMITS.get(key, TINY_MAX_INT):
                    raise ConfigError(f"fusion.tiny.{key} is {value}, above the limit of "
                                      f"{TINY_LIMITS.get(key, TINY_MAX_INT)}")
            elif value is not None and not isinstance(value, (bool, float, str)):
                raise ConfigError(f"fusion.tiny.{key} must be a number, string or boolean")
        if self.tiny.get("attn_implementation") not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(f"fusion.tiny.attn_implementation must be one of {ATTN_IMPLEMENTATIONS}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(f"fusion.attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, "
                              f"got {str(self.attn_implementation)[:80]!r}")
        if self.prompt_style not in STYLES:
            raise ConfigError(f"fusion.prompt_style must be one of {STYLES}, got {self.prompt_style!r}")
        self.lora.validate()
        self.encoder.validate()
        return self


__all__ = ["AUDIO_SCALES", "EncoderInfo", "FusionConfig", "HTSATConfig", "LoraSettings", "MAX_AUDIO_TOKENS",
           "MODES", "PROJECTOR_FINALS", "PROJECTOR_KINDS", "ProjectorConfig", "SEGMENTS"]
