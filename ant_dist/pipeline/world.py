"""A synthetic world ready to train on: synthesise raw domains, pack them, embed them.

The demo, the tests' shared fixture and the benches all start from one; this is that set-up
once (each caller picks the sizes and the encoders).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ant_dist.config import EmbedConfig, PackConfig, SynthConfig
from ant_dist.data.pack import pack_domain
from ant_dist.data.synth import synthesize
from ant_dist.features.embedding import run as run_embed


def pack_manifest(manifest: dict, shards: str | Path, roles=("aux", "target"), **pack_options) -> list[tuple]:
    """Pack every domain a `synthesize` manifest lists; returns (role, domain, pack report) per domain."""
    packed = []
    for role in roles:
        for d in manifest[role]:
            report = pack_domain(PackConfig(domain=d["name"], format=manifest["format"], meta=d["meta"],
                                            interactions=d["interactions"], images=d["images"], out=str(shards),
                                            **pack_options))
            packed.append((role, d["name"], report))
    return packed


def embed_world(root: str | Path, text_encoder: str | Path, image_encoder: str | Path, **embed_options) -> dict:
    """Embed every packed domain under <root>/shards into <root>/features (MiniLM-style mean pooling)."""
    root = Path(root)
    return run_embed(EmbedConfig(shards=str(root / "shards"), out=str(root / "features"),
                                 text_encoder=str(text_encoder), image_encoder=str(image_encoder),
                                 **{"text_pooling": "mean", **embed_options}))


def build_world(root: str | Path, synth: SynthConfig, text_encoder: str | Path, image_encoder: str | Path,
                pack_options: Optional[dict] = None, embed_options: Optional[dict] = None) -> dict:
    """<root>/raw (synth.out is set to it), <root>/shards, <root>/features; returns the manifest."""
    root = Path(root)
    synth.out = str(root / "raw")
    manifest = synthesize(synth)
    pack_manifest(manifest, root / "shards", **(pack_options or {}))
    embed_world(root, text_encoder, image_encoder, **(embed_options or {}))
    return manifest
