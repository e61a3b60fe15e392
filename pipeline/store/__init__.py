"""The on-disk formats, and the only importer of h5py (no torch here):

    cache.py       the feature cache file (HDF5) and its reader, FeatureCache
    partial.py     an extraction's crash-safe partial folder, PartialCache, and the extraction lock
    head_file.py   head files (HDF5 arrays, no pickle)
    results.py     stage two's JSON: one result per trained head (HeadResult), sweep records

Every structured attribute is JSON parsed as data only, and every array loads
without pickle: nothing read from a file is ever executed.
"""
import h5py

from .cache import (CACHE_FORMAT, FeatureCache, codes_key, read_cache_identity, read_cache_settings,
                    split_key)
from .head_file import HEAD_FORMAT, read_head, write_head
from .results import (HEADS, HeadResult, SweepRecord, cache_identity_in, read_result, read_sweep_record, sweep_made_before_cache,
                      sweeps_choice, write_json)
from .partial import (PartialCache, Reuse, extraction_lock, partial_path, partial_progress, read_partial_settings,
                      remove_partial)

H5PY_VERSION = h5py.__version__

__all__ = ["CACHE_FORMAT", "HEAD_FORMAT", "H5PY_VERSION", "HEADS", "FeatureCache", "HeadResult", "PartialCache",
           "Reuse", "SweepRecord", "cache_identity_in", "read_result", "read_sweep_record", "write_json", "codes_key",
           "extraction_lock", "partial_path", "partial_progress", "read_cache_identity", "read_cache_settings",
           "read_head", "read_partial_settings", "remove_partial", "split_key", "sweep_made_before_cache",
           "sweeps_choice", "write_head"]
