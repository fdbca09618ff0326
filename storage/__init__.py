"""Artifact store, Parquet IO, token windows, checkpoints and the DuckDB catalog (no prefect here)."""
