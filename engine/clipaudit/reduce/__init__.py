"""The reduce step (Parquet in, identities/calibration/metrics out; no model): see
:mod:`.pipeline` for the order of its steps."""

from .identities import identities_table
from .pipeline import ReduceOptions, ReduceResult, reduce_outputs

__all__ = ["ReduceOptions", "ReduceResult", "identities_table", "reduce_outputs"]
