"""Bundled pretraining presets (YAML data files)."""
