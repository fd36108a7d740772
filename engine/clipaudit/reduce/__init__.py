"""The reduce step (Parquet in, identities/calibration/metrics out; no model): see
:mod:`.pipeline` for the order of its steps."""

from clipaudit.reduce.identities import identities_table
from clipaudit.reduce.pipeline import ReduceResult, reduce_outputs
from clipaudit.reduce.options import ReduceOptions

__all__ = ["ReduceOptions", "ReduceResult", "identities_table", "reduce_outputs"]
