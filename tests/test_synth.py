"""The synthetic world has the properties later stages rely on (docs/synthetic.md)."""

import csv
import gzip
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ant_dist.config import SynthConfig
from ant_dist.data.synth import shared_world, synthesize


def _cfg(out, **kw):
    base = dict(out=str(out), aux_domains=["Food", "Home"], target_domains=["Office"], items_per_domain=300,
                users_per_domain=600, target_items_per_domain=150, target_users_per_domain=60, image_size=24,
                progress=False)
    base.update(kw)
    return SynthConfig(**base)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, synthesize(_cfg(out))


def test_same_seed_same_bytes(world, tmp_path):
    out, _ = world
    synthesize(_cfg(tmp_path))
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name not in ("synth_config.yaml", "synth_manifest.json"):  # these record paths
            assert p.read_bytes() == (tmp_path / p.relative_to(out)).read_bytes(), p


def test_targets_are_data_poor(world):
    _, manifest = world
    aux = min(d["interactions_written"] for d in manifest["aux"])
    assert all(d["interactions_written"] * 5 < aux for d in manifest["target"])


def _styles(out: Path, domain: str) -> dict[str, int]:
    with open(out / domain / "latent.csv") as fh:
        return {r["item_id"]: int(r["style"]) for r in csv.DictReader(fh)}


def _sequences(out: Path, domain: str) -> dict[str, list[str]]:
    seqs = defaultdict(list)
    with open(out / domain / f"{domain}.csv") as fh:
        for item, user, _, ts in csv.reader(fh):
            seqs[user].append((int(ts), item))
    return {u: [i for _, i in v] for u, v in seqs.items()}  # file order = generation order


def test_shared_second_order_dynamics(world):
    out, manifest = world
    table = shared_world(0, 24)["transition"]
    for d in manifest["aux"] + manifest["target"]:
        style = _styles(out, d["name"])
        hits = total = 0
        for seq in _sequences(out, d["name"]).values():
            s = [style[i] for i in seq]
            for t in range(2, len(s)):
                hits += s[t] == table[s[t - 2], s[t - 1]]
                total += 1
        assert hits / total > 0.7, (d["name"], hits / total)  # follow_prob = 0.75


def test_images_carry_style_across_domains_and_texts_do_not(world):
    out, _ = world

    def by_style(domain):
        style = _styles(out, domain)
        colours, words = defaultdict(list), defaultdict(set)
        with gzip.open(out / domain / f"meta_{domain}.json.gz", "rt") as fh:
            for line in fh:
                rec = json.loads(line)
                s = style[rec["asin"]]
                words[s].add(rec["title"].split()[0].lower())  # the style word leads the title
                img = next(iter((out / domain / "images").glob(f"{rec['asin']}.*")), None)
                if img is not None:
                    colours[s].append(np.asarray(Image.open(img).convert("RGB"))[0, 0].astype(float))
        return {s: np.mean(c, axis=0) for s, c in colours.items()}, words

    col_a, words_a = by_style("Food")
    col_b, words_b = by_style("Office")
    common = sorted(set(col_a) & set(col_b))
    same = np.mean([np.abs(col_a[s] - col_b[s]).mean() for s in common])
    other = np.mean([np.abs(col_a[s] - col_b[t]).mean() for s in common for t in common if s != t])
    assert same < 0.3 * other  # a style looks alike in every domain
    assert all(words_a[s].isdisjoint(words_b[s]) for s in common)  # but is named differently
    assert all(len(words_a[s]) == 1 for s in words_a)  # one word per style within a domain
