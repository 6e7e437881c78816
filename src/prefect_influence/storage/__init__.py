"""Where a job's results live: one output URL, its manifest, lease, arrays and records.

* :mod:`.store` — :class:`InfluenceStore`, the layout under the output URL and the
  checksummed completion records that make a rerun resume.
* :mod:`.manifest` — :class:`Manifest` and :class:`Grid`, what the output holds.
* :mod:`.lease` — which run writes to the output.
* :mod:`.plain_chunks` — whole uncompressed zarr chunks as files.
* :mod:`.credentials` — storage options with their secret, resolved where storage is opened.
"""

from .credentials import set_secret_loader, storage_options
from .lease import Lease
from .manifest import SCHEMA_VERSION, Grid, Manifest
from .store import (
    FACTORS,
    INFLUENCES,
    SELF_INFLUENCE,
    SUMMARY_ARRAYS,
    TRAIN_FEATURES,
    InfluenceStore,
    checksum,
)

__all__ = [
    "InfluenceStore",
    "Manifest",
    "Grid",
    "Lease",
    "SCHEMA_VERSION",
    "FACTORS",
    "INFLUENCES",
    "SELF_INFLUENCE",
    "TRAIN_FEATURES",
    "SUMMARY_ARRAYS",
    "checksum",
    "storage_options",
    "set_secret_loader",
]
