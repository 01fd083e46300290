import os

import pytest

# Tests never reach a model hub, and never need W&B's servers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Two auxiliary domains (Food, Home) and one target (Office), packed and embedded with tiny random
    encoders (for training tests)."""
    from ant_dist.config import EmbedConfig, PackConfig, SynthConfig
    from ant_dist.data.pack import pack_domain
    from ant_dist.data.synth import synthesize
    from ant_dist.embed import run as embed
    from ant_dist.encoders import save_random_bert, save_random_swin

    root = tmp_path_factory.mktemp("world")
    save_random_bert(root / "bert")
    save_random_swin(root / "swin", image_size=32, embed_dim=16)
    manifest = synthesize(SynthConfig(out=str(root / "raw"), aux_domains=["Food", "Home"], target_domains=["Office"],
                                      items_per_domain=300, users_per_domain=500, target_items_per_domain=120,
                                      target_users_per_domain=150, image_size=32, progress=False))
    for d in manifest["aux"] + manifest["target"]:
        pack_domain(PackConfig(domain=d["name"], meta=d["meta"], interactions=d["interactions"], images=d["images"],
                               out=str(root / "shards"), shard_max_items=100, workers=1, progress=False))
    embed(EmbedConfig(shards=str(root / "shards"), out=str(root / "features"), text_encoder=str(root / "bert"),
                      image_encoder=str(root / "swin"), text_pooling="mean", batch_size=64, num_workers=0,
                      progress=False))
    return root
