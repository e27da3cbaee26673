"""Manifests -> audio -> codes (codec, code cache, prepare) -> prompts -> dataset -> batches."""
