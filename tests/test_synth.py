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


# ---------------------------------------------------------------- target_render_shift
@pytest.fixture(scope="module")
def world_at(tmp_path_factory, world):
    """world_at(shift): the fixture world's config, synthesised with that target_render_shift."""
    cache = {0.0: world}

    def get(shift: float, merge: float = 0.0):
        key = shift if merge == 0.0 else (shift, merge)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"shift{shift}-merge{merge}")
            cache[key] = out, synthesize(_cfg(out, target_render_shift=shift, target_render_merge=merge))
        return cache[key]
    return get


def _image_descriptors(out: Path, domain: str) -> tuple[np.ndarray, np.ndarray]:
    """Per image: median (≈ background), mean and std of RGB, read from the files; and the true style."""
    style = _styles(out, domain)
    feats, labels = [], []
    for p in sorted((out / domain / "images").iterdir()):
        px = np.asarray(Image.open(p).convert("RGB"), dtype=float).reshape(-1, 3)
        feats.append(np.concatenate([np.median(px, 0), px.mean(0), px.std(0)]))
        labels.append(style[p.stem])
    return np.array(feats), np.array(labels)


def _log_prices(out: Path, domain: str) -> tuple[np.ndarray, np.ndarray]:
    style = _styles(out, domain)
    feats, labels = [], []
    with gzip.open(out / domain / f"meta_{domain}.json.gz", "rt") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec["price"]:  # "$1,234.50" or a range "$a - $b": its low end
                feats.append([np.log(float(rec["price"].split()[0].lstrip("$").replace(",", "")))])
                labels.append(style[rec["asin"]])
    return np.array(feats), np.array(labels)


def _aux_trained_predictions(out: Path, manifest: dict, read) -> tuple[np.ndarray, np.ndarray]:
    """Fit feature -> style on the auxiliary domains' items; predict the target domains' items."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def stack(domains):
        parts = [read(out, d["name"]) for d in domains]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    x_aux, y_aux = stack(manifest["aux"])
    x_tgt, y_tgt = stack(manifest["target"])
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x_aux, y_aux)
    return clf.predict(x_tgt), y_tgt


@pytest.mark.parametrize("read", [_image_descriptors, _log_prices], ids=["image", "price"])
def test_render_shift_turns_aux_item_model_from_informative_to_chance(world_at, read):
    from scipy.stats import binomtest
    chance = 1 / 24
    pred, truth = _aux_trained_predictions(*world_at(0.0), read)
    hits = int((pred == truth).sum())
    assert binomtest(hits, len(truth), chance, alternative="greater").pvalue < 1e-6, hits / len(truth)
    if read is _image_descriptors:
        assert hits / len(truth) > 0.8  # images name the style almost perfectly when shared
    pred, truth = _aux_trained_predictions(*world_at(1.0), read)
    hits = int((pred == truth).sum())
    # not above chance by more than binomial noise (one-sided, p = 0.01)
    assert binomtest(hits, len(truth), chance, alternative="greater").pvalue > 0.01, hits / len(truth)


def test_render_shift_half_restyles_half_the_styles_as_manifest_says(world_at):
    out, manifest = world_at(0.5)
    saved = json.loads((out / "synth_manifest.json").read_text())
    assert saved["target_render_shift"] == 0.5
    looks = np.array(saved["target_looks"])
    assert (looks != np.arange(24)).sum() == 12  # round(0.5 * n_styles)
    pred, truth = _aux_trained_predictions(out, manifest, _image_descriptors)
    # what the aux-trained map calls each target style (majority over its items), from the pixels
    seen_as = {s: np.bincount(pred[truth == s], minlength=24).argmax() for s in np.unique(truth)}
    assert sum(seen_as[s] == looks[s] for s in seen_as) >= 0.9 * len(seen_as)  # each looks as recorded
    assert abs(sum(seen_as[s] != s for s in seen_as) - 0.5 * len(seen_as)) <= 0.1 * len(seen_as)


def test_render_shift_leaves_aux_domains_and_dynamics_alone(world, world_at):
    base, manifest = world
    shifted, _ = world_at(1.0)
    for d in manifest["aux"]:  # auxiliary domains: every file byte-identical
        for p in sorted((base / d["name"]).rglob("*")):
            if p.is_file():
                assert p.read_bytes() == (shifted / p.relative_to(base)).read_bytes(), p
    for d in manifest["target"]:  # targets: same items, styles and sequences, different pictures
        name = d["name"]
        for f in (f"{name}.csv", "latent.csv"):
            assert (base / name / f).read_bytes() == (shifted / name / f).read_bytes(), f
        images = sorted((base / name / "images").iterdir())
        assert images and all(p.read_bytes() != (shifted / name / "images" / p.name).read_bytes() for p in images)


@pytest.mark.parametrize("shift", [-0.1, 1.5])
def test_render_shift_out_of_range_is_refused_before_writing(tmp_path, shift):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="target_render_shift"):
        synthesize(_cfg(out, target_render_shift=shift))
    assert not out.exists()


# ---------------------------------------------------------------- target_render_merge
def test_render_merge_shows_two_styles_alike_and_the_aux_model_names_one(world_at):
    """At merge 1 the 24 styles form 12 pairs sharing one look; from the pixels, an aux-trained
    image->style map calls both styles of a pair by the first one's name, so it is confidently
    wrong on the other: right on about half the target styles, not at chance."""
    out, manifest = world_at(0.0, merge=1.0)
    saved = json.loads((out / "synth_manifest.json").read_text())
    assert saved["target_render_merge"] == 1.0
    looks = np.array(saved["target_looks"])
    assert sorted(np.bincount(looks, minlength=24)) == [0] * 12 + [2] * 12  # 12 looks, each shown by 2 styles
    assert set(looks) <= set(range(24)) and (looks == np.arange(24)).sum() == 12  # the first of each pair keeps its own
    pred, truth = _aux_trained_predictions(out, manifest, _image_descriptors)
    seen_as = {s: np.bincount(pred[truth == s], minlength=24).argmax() for s in np.unique(truth)}
    assert sum(seen_as[s] == looks[s] for s in seen_as) >= 0.9 * len(seen_as)  # each looks as recorded
    wrong = sum(seen_as[s] != s for s in seen_as)
    assert abs(wrong - 0.5 * len(seen_as)) <= 0.1 * len(seen_as)  # the second style of every pair


def test_render_merge_half_is_a_subset_and_combines_with_shift(world_at):
    from ant_dist.data.synth import merged_looks, target_looks
    ident = np.arange(24)
    half, full = merged_looks(0, 24, 0.5, ident), merged_looks(0, 24, 1.0, ident)
    assert (half != ident).sum() == 6 and all(full[s] == half[s] for s in np.flatnonzero(half != ident))
    odd = merged_looks(0, 24, 3 / 24, ident)  # 3 styles: a pair plus one joining it
    assert (odd != ident).sum() == 2 and len(set(odd[odd != ident])) == 1
    shifted = target_looks(0, 24, 1.0)
    both = merged_looks(0, 24, 1.0, shifted)
    assert np.array_equal(both, shifted[full])  # merging acts on the looks the shift gave
    assert merged_looks(0, 24, 0.0, shifted) is shifted  # merge 0: no change, no random draw


@pytest.mark.parametrize("merge", [-0.1, 1.5])
def test_render_merge_out_of_range_is_refused_before_writing(tmp_path, merge):
    out = tmp_path / "never"
    with pytest.raises(ValueError, match="target_render_merge"):
        synthesize(_cfg(out, target_render_merge=merge))
    assert not out.exists()
