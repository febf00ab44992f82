"""Serving what was registered: an OpenAI-compatible endpoint for a model folder (no ZenML here)."""
