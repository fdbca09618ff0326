"""Configs, manifests and table schemas shared by every lmpipe package (pydantic + pyarrow only)."""
