"""gradtrace's bottom floor: the run-store format, the one definition of the on-disk layout.

:mod:`gradtrace_format.format` holds every array's name, dims, dtype, chunks, codecs and
attributes, the tiers, the parameter table, the header and the commit marker;
:mod:`gradtrace_format.integrity` reads chunks with their checksums checked and verifies a
store; :mod:`gradtrace_format.errors` holds the typed errors of bad input. The spec in prose is
``docs/format.md``.

It imports numpy, zarr, numcodecs and google_crc32c only (never torch, xarray, pandas or
dask), so both stages stand on it: :mod:`capture` writes stores with it, :mod:`analysis` reads
them, and neither imports the other.
"""

from gradtrace_format.format import (
    FORMAT_VERSION,
    DamagedStoreError,
    FormatVersionError,
    NotAStoreError,
    StoreError,
)

__all__ = ["FORMAT_VERSION", "StoreError", "NotAStoreError", "FormatVersionError", "DamagedStoreError"]
