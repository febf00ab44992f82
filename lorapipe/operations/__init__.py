"""Operating lorapipe: recent runs from the ZenML store, and watching a training from its metrics files."""
