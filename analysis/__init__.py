"""gradtrace analysis stage: reads run stores with xarray + dask. Never imports torch."""
