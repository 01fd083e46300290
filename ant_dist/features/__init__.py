"""Frozen encoders and the feature tables they fill: the embedding pass, the memory-mapped tables, the joint catalog's features for training and serving."""
