"""Scores of loaded models, whatever loaded them: masked loss, generation and its text metrics (metrics.py, which
says what each score means), a classifier's report (classification.py) and the merge check's comparison parts
(merge_check.py). Each task's evaluation (`lorapipe.tasks.<task>.evaluate`) decides which models are scored and
calls these."""
