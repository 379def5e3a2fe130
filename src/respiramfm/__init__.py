"""respiramfm: multimodal respiratory-disease recognition (RespiraMFM method).

Importing the package is cheap and never touches the network; heavy modules
(torch, transformers) are imported by the submodules that need them.
"""

__version__ = "0.1.0"

from respiramfm.errors import (  # noqa: F401  (re-exported)
    AudioDecodeError,
    CheckpointError,
    ConfigError,
    DataError,
    RespiraMFMError,
)
