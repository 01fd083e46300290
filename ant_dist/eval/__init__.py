"""Evaluation: full-ranking metrics and t-tests, the results format, the report's tables and plots, transferability probes."""
