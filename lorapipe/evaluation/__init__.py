"""Offline evaluation: base vs tuned (and any saved model folder) on the held-out rows; see metrics.py for
what each score means."""
