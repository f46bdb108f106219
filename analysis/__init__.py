"""gradtrace analysis stage: reads run stores with xarray + dask. Never imports torch.

(torch is imported lazily only to read a PyTorch checkpoint given as an RSI reference.)

Example:
    >>> import analysis as ga
    >>> run = ga.open_run("runs/cnn.zarr")                     # doctest: +SKIP
    >>> ga.corr_matrix(run, slice(0, 99))                       # (step_i, step_j)  # doctest: +SKIP
    >>> ga.corr(run, 10, 40)                                    # mu(10, 40)        # doctest: +SKIP
    >>> ga.mean_corr(run, h=5)                                  # zigzag eq. 3      # doctest: +SKIP
    >>> ga.sign_shift_lag(run, 1)                               # doctest: +SKIP
    >>> ga.rsi(run, reference="final", exclude_tail="epoch")    # doctest: +SKIP
    >>> ga.layer_table(run)                                     # doctest: +SKIP
    >>> ga.build_index(run)           # T x T matrices: later queries read no data  # doctest: +SKIP
    >>> ga.never_turns_away(run).attrs["steps"]                 # doctest: +SKIP
"""

from analysis.correlation import corr, corr_matrix, corr_window, corr_windows, lag_series, mean_corr
from gradtrace_format.errors import (
    AnalysisError,
    BadReferenceError,
    LagNotAvailableError,
    ParamSelectionError,
    StepNotFoundError,
    TierError,
)
from gradtrace_format.format import DamagedStoreError, FormatVersionError, NotAStoreError, StoreError
from gradtrace_format.integrity import verify_store
from analysis.index import build_index, open_index
from analysis.layers import balancedness, layer_table, linear_pairs
from analysis.phases import gawu_switch, phase_labels, phases, zigzag_share
from analysis.reference import Reference, resolve_reference
from analysis.rsi import by_epoch, rsi
from analysis.rsi_pairs import never_turns_away, rsi_all_references
from analysis.signs import sign_shift, sign_shift_lag, sign_shift_matrix, sign_shift_window
from analysis.store import ParamGroup, Run, open_run

__all__ = [
    # opening a store
    "open_run",
    "Run",
    "ParamGroup",
    "verify_store",
    # correlation (zigzag paper)
    "corr",
    "corr_matrix",
    "corr_window",
    "corr_windows",
    "lag_series",
    "mean_corr",
    # sign shift
    "sign_shift",
    "sign_shift_matrix",
    "sign_shift_window",
    "sign_shift_lag",
    # RSI / EB / gamma
    "rsi",
    "by_epoch",
    "resolve_reference",
    "Reference",
    "rsi_all_references",
    "never_turns_away",
    # query index
    "build_index",
    "open_index",
    # phases
    "phases",
    "phase_labels",
    "zigzag_share",
    "gawu_switch",
    # layers
    "layer_table",
    "balancedness",
    "linear_pairs",
    # errors
    "StoreError",
    "NotAStoreError",
    "FormatVersionError",
    "DamagedStoreError",
    "AnalysisError",
    "StepNotFoundError",
    "LagNotAvailableError",
    "ParamSelectionError",
    "BadReferenceError",
    "TierError",
]
