"""Dataset adapters: a published dataset, laid out as its publishers ship it -> records.

Each adapter is ``load_<name>(root: Path, **opts) -> AdapterResult`` and is listed in
:data:`ADAPTERS`. ``AdapterResult.records`` holds every record the adapter could build
(context already rendered); ``AdapterResult.problems`` holds one ``path<TAB>cause``
line per item that was skipped, left metadata-only or otherwise needs a look.

Record and patient ids carry the dataset name as a prefix (``icbhi/101``), so
manifests of several datasets can be concatenated without id clashes.

Canonical diagnosis strings emitted (tasks match them exactly):

=========  =================================================================
icbhi      copd, healthy, urti, lrti, asthma, pneumonia, bronchiectasis, bronchiolitis
kauh       healthy, asthma, copd, pneumonia, heart failure, lung fibrosis,
           pleural effusion, bron, and comorbid "a + b" strings
coswara    covid, healthy, recovered_full, no_resp_illness_exposed,
           resp_illness_not_identified, under_validation
coughvid   covid, healthy, symptomatic, "" (no status)
ukcovid19  covid, non-covid, "" (no result)
codatb     tb, non-tb
generic    whatever the user's CSV (after --diagnosis-map) says, lower-cased
=========  =================================================================
"""

from __future__ import annotations

from typing import Callable

from respiramfm.data.datasets.codatb import load_codatb
from respiramfm.data.datasets.common import AdapterResult
from respiramfm.data.datasets.coswara import load_coswara
from respiramfm.data.datasets.coughvid import load_coughvid
from respiramfm.data.datasets.generic import load_generic
from respiramfm.data.datasets.icbhi import load_icbhi, read_icbhi_official
from respiramfm.data.datasets.icbhi_segments import load_icbhi_auto, load_icbhi_segments
from respiramfm.data.datasets.kauh import load_kauh
from respiramfm.data.datasets.ukcovid19 import load_ukcovid19
from respiramfm.errors import ConfigError

ADAPTERS: dict[str, Callable[..., AdapterResult]] = {
    "icbhi": load_icbhi_auto,
    "kauh": load_kauh,
    "coswara": load_coswara,
    "coughvid": load_coughvid,
    "ukcovid19": load_ukcovid19,
    "codatb": load_codatb,
    "generic": load_generic,
}


def get_adapter(name: str) -> Callable[..., AdapterResult]:
    try:
        return ADAPTERS[name]
    except KeyError:
        raise ConfigError(f"unknown dataset {name!r}; known: {sorted(ADAPTERS)}") from None


__all__ = ["ADAPTERS", "AdapterResult", "get_adapter", "load_codatb", "load_coswara", "load_coughvid",
           "load_generic", "load_icbhi", "load_icbhi_auto", "load_icbhi_segments", "load_kauh", "load_ukcovid19", "read_icbhi_official"]
