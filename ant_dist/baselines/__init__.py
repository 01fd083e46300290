"""The paper's RecBole baselines (NPE, SASRec, BERT4Rec, FDSA, S3-Rec) on our packed domains, scored
by our metrics: `python -m ant_dist.baselines` (ant_dist/baselines/run.py; docs/baselines.md)."""
