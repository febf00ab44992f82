"""Training helpers shared by backends: monitoring (metrics files, progress lines, plots) and memory care."""
