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
    from ant_dist.config import SynthConfig
    from ant_dist.features.encoders import save_random_bert, save_random_swin
    from ant_dist.pipeline.world import build_world

    root = tmp_path_factory.mktemp("world")
    save_random_bert(root / "bert")
    save_random_swin(root / "swin", image_size=32, embed_dim=16)
    build_world(root, SynthConfig(aux_domains=["Food", "Home"], target_domains=["Office"], items_per_domain=300,
                                  users_per_domain=500, target_items_per_domain=120, target_users_per_domain=150,
                                  image_size=32, progress=False),
                root / "bert", root / "swin", pack_options={"shard_max_items": 100, "workers": 1, "progress": False},
                embed_options={"batch_size": 64, "num_workers": 0, "progress": False})
    return root
