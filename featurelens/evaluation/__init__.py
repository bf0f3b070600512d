"""Evaluating SAEs: reconstruction and sparsity metrics (metrics.py), the reconstruction spliced into the
model for CE loss / KL (splice.py), ground-truth recovery on synthetic data (synthetic.py), and the HTML
report (report.py); run.py ties them into ``featurelens eval``."""
