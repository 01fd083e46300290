"""Serving a trained model: top-k recommendations and the self-contained serving export."""
