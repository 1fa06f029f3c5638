"""Bundled fine-tuning recipes (YAML data files; ``python -m downstream.cls --help`` shows their values)."""
