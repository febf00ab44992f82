"""The phases of a fine-tune as the steps run them: train (in this process or over data-parallel processes),
evaluate, merge, predict, and the measured probe of a few real steps. The top of the plain library: a phase picks the
task and the backend an adapter names and calls them; nothing below imports a phase."""
