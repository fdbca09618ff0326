"""Prefect orchestration and the `lmpipe` CLI (the only package that imports prefect, and only lazily)."""
