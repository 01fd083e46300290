"""A synthetic multi-domain world in the Amazon 2018 raw format, built so that transfer is measurable.

The world (all knobs in `SynthConfig`, documented in docs/synthetic.md):
- `n_styles` latent styles are shared by every domain. An item has one style; the style
  decides its image (background colour, shape, texture), its price level, and one word of
  its title. That word comes from the *domain's own* vocabulary, so texts identify the
  style only within a domain, while images and prices mean the same everywhere (the
  paper's section 6.3 finding).
- Sequential dynamics are second order and shared by all domains: with probability
  `follow_prob` the next style is T[style(t-2), style(t-1)] for one fixed random table T;
  otherwise the user returns to one of their `interests_per_user` styles. Within a style,
  the item is drawn by a Zipf-like popularity.
- Target domains are data-poor (about 10x fewer users than an auxiliary domain), so a model
  trained on a target alone cannot learn T well, and pre-training on the auxiliary domains can.
- `target_render_shift` (0 by default) makes a fraction of the styles look and cost like a
  *different* style in the target domains only, so an item model learned on the auxiliary
  domains misleads there, while the shared dynamics still let a user model transfer.
- `target_render_merge` (0 by default) makes a fraction of the styles, in pairs, look and cost
  *alike* in the target domains only: two styles the auxiliary domains keep apart show one look,
  so an item model learned there is confidently wrong about one style of every pair.
Everything is a pure function of the seed.
"""

from __future__ import annotations

import gzip
import io
import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ant_dist.config import SynthConfig, save_config
from ant_dist.runtime.processes import die_with_parent

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
TEXTURES = ("plain", "stripes", "dots", "grid")
SYLLABLES = ("ka", "lo", "mi", "ren", "tu", "sa", "vel", "dor", "ix", "qua", "no", "pe", "zu",
             "bra", "fen", "gol", "hu", "jat", "kor", "lum", "mar", "nix", "ost", "pra", "ril",
             "sto", "tav", "ulm", "vor", "wen", "yas", "zel")


def _word(rng: np.random.Generator, n_syll: tuple[int, int] = (2, 3)) -> str:
    k = int(rng.integers(n_syll[0], n_syll[1] + 1))
    return "".join(SYLLABLES[int(i)] for i in rng.integers(0, len(SYLLABLES), size=k))


def _vocab(rng: np.random.Generator, n: int) -> list[str]:
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        w = _word(rng)
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def shared_world(seed: int, n_styles: int) -> dict:
    """The cross-domain part of the world: style looks, price levels, the transition table."""
    rng = np.random.default_rng([seed, 7919])
    return {
        "colour": rng.integers(30, 226, size=(n_styles, 3)),
        "fg_colour": rng.integers(0, 256, size=(n_styles, 3)),
        "shape": rng.integers(0, len(SHAPES), size=n_styles),
        "texture": rng.integers(0, len(TEXTURES), size=n_styles),
        "log_price": rng.uniform(np.log(2.0), np.log(400.0), size=n_styles),
        "transition": rng.integers(0, n_styles, size=(n_styles, n_styles)),
    }


# What `target_render_shift` re-maps: everything an item's image and price level show.
LOOK_KEYS = ("colour", "fg_colour", "shape", "texture", "log_price")


def target_looks(seed: int, n_styles: int, shift: float) -> np.ndarray:
    """For each style, the style whose look (image and price level) it shows in the target domains.

    round(shift * n_styles) styles, chosen by the seed, are re-mapped; the set grows with `shift`
    (a prefix of one seeded order), so a larger shift only adds re-mapped styles. They borrow each
    other's looks along one cycle, a permutation without fixed points: each re-mapped style looks
    exactly like another style of the auxiliary domains, so an aux-trained image->style map is
    actively wrong on it, not just unsure, and the targets' overall mix of looks stays the same
    (a domain classifier gains nothing). A single re-mapped style borrows the look of another one.
    """
    if not 0.0 <= shift <= 1.0:
        raise ValueError(f"target_render_shift must be in [0, 1], got {shift}")
    looks = np.arange(n_styles)
    k = int(np.floor(shift * n_styles + 0.5))
    if k == 0 or n_styles < 2:
        return looks  # no rng drawn: the default world stays byte-identical to the unshifted one
    order = np.random.default_rng([seed, 104729]).permutation(n_styles)
    chosen = order[:k]
    looks[chosen] = np.roll(chosen, -1) if k >= 2 else order[1]
    return looks


def merged_looks(seed: int, n_styles: int, merge: float, looks: np.ndarray) -> np.ndarray:
    """`looks` with round(merge * n_styles) styles, chosen by the seed, merged in pairs: the second
    style of each pair shows the first one's look (with an odd count, the last style joins the
    last pair). The set grows with `merge` (a prefix of one seeded order, paired in that order)."""
    if not 0.0 <= merge <= 1.0:
        raise ValueError(f"target_render_merge must be in [0, 1], got {merge}")
    k = int(np.floor(merge * n_styles + 0.5))
    if k < 2:
        return looks  # no rng drawn: the world stays byte-identical to the unmerged one
    order = np.random.default_rng([seed, 130363]).permutation(n_styles)[:k]
    out = looks.copy()
    for i in range(0, k - 1, 2):
        out[order[i + 1]] = looks[order[i]]
    if k % 2:
        out[order[k - 1]] = looks[order[k - 3]]
    return out


def restyled_world(world: dict, looks: np.ndarray) -> dict:
    """`world` with style s rendered and priced as style looks[s]; the transition table is kept."""
    out = dict(world)
    for key in LOOK_KEYS:
        out[key] = world[key][looks]
    return out


def draw_image(style_colour, fg_colour, shape: int, texture: int, size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    bg = tuple(int(c) for c in np.clip(style_colour + rng.normal(0, 12, 3), 0, 255))
    fg = tuple(int(c) for c in np.clip(fg_colour + rng.normal(0, 12, 3), 0, 255))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    step = max(size // 8, 2)
    if TEXTURES[texture] == "stripes":
        for x in range(0, size, step):
            d.line([(x, 0), (x, size)], fill=fg, width=1)
    elif TEXTURES[texture] == "dots":
        for x in range(step // 2, size, step):
            for y in range(step // 2, size, step):
                d.point((x, y), fill=fg)
    elif TEXTURES[texture] == "grid":
        for x in range(0, size, step):
            d.line([(x, 0), (x, size)], fill=fg)
            d.line([(0, x), (size, x)], fill=fg)
    r = size * rng.uniform(0.22, 0.34)
    cx, cy = size / 2 + rng.normal(0, size * 0.05, 2)
    box = [cx - r, cy - r, cx + r, cy + r]
    name = SHAPES[shape]
    if name == "circle":
        d.ellipse(box, fill=fg)
    elif name == "square":
        d.rectangle(box, fill=fg)
    elif name == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif name == "diamond":
        d.polygon([(cx, cy - r), (cx - r, cy), (cx, cy + r), (cx + r, cy)], fill=fg)
    elif name == "cross":
        w = r / 3
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
    else:
        d.ellipse(box, outline=fg, width=max(int(r / 3), 1))
    return img


def _image_job(args) -> None:
    path, colour, fg, shape, texture, size, seed = args
    img = draw_image(colour, fg, shape, texture, size, seed)
    tmp = path + ".tmp"
    img.save(tmp, format="PNG" if path.endswith(".png") else "JPEG", quality=85)
    os.replace(tmp, path)


def _format_price(rng: np.random.Generator, price: float) -> str:
    if rng.random() < 0.05:  # a price range, as Amazon shows for variants
        hi = price * rng.uniform(1.2, 2.0)
        return f"${price:,.2f} - ${hi:,.2f}"
    return f"${price:,.2f}"


def simulate_sequences(rng: np.random.Generator, world: dict, item_style: np.ndarray, n_users: int,
                       cfg: SynthConfig) -> list[np.ndarray]:
    """Item indices per user, all users stepped together (vectorised for paper-scale runs)."""
    n_styles = len(world["transition"])
    by_style = [np.flatnonzero(item_style == s) for s in range(n_styles)]
    # Zipf-like popularity inside each style, cumulative for vectorised sampling.
    cum = []
    for idx in by_style:
        w = 1.0 / np.arange(1, len(idx) + 1) ** 0.8
        cum.append(np.cumsum(w) / w.sum())
    lengths = rng.integers(cfg.seq_len_min, cfg.seq_len_max + 1, size=n_users)
    interests = rng.integers(0, n_styles, size=(n_users, cfg.interests_per_user))
    t_max = int(lengths.max())
    styles = np.zeros((n_users, t_max), dtype=np.int64)
    styles[:, 0] = interests[:, 0]
    styles[:, 1] = interests[np.arange(n_users), rng.integers(0, cfg.interests_per_user, n_users)]
    for t in range(2, t_max):
        follow = rng.random(n_users) < cfg.follow_prob
        mapped = world["transition"][styles[:, t - 2], styles[:, t - 1]]
        own = interests[np.arange(n_users), rng.integers(0, cfg.interests_per_user, n_users)]
        styles[:, t] = np.where(follow, mapped, own)
    chosen = np.zeros_like(styles)
    u = rng.random(styles.shape)
    for s in range(n_styles):
        mask = styles == s
        if not mask.any():
            continue
        if len(by_style[s]) == 0:  # a style without items in this domain: nearest style that has some
            alt = next(a for a in range(n_styles) if len(by_style[(s + a) % n_styles]))
            styles[mask] = (s + alt) % n_styles
            s = (s + alt) % n_styles
        chosen[mask] = by_style[s][np.minimum(np.searchsorted(cum[s], u[mask]), len(by_style[s]) - 1)]
    return [chosen[i, : lengths[i]] for i in range(n_users)]


def write_domain(cfg: SynthConfig, world: dict, domain: str, d_index: int, n_items: int, n_users: int,
                 out: Path, pool) -> dict:
    rng = np.random.default_rng([cfg.seed, d_index, 31337])
    ddir = out / domain
    (ddir / "images").mkdir(parents=True, exist_ok=True)
    n_styles = cfg.n_styles
    style_word = _vocab(rng, n_styles)      # this domain's word for each style
    nouns = _vocab(rng, 40)
    fillers = _vocab(rng, 120)
    subcats = [w.capitalize() for w in _vocab(rng, 8)]
    brands = [w.capitalize() for w in _vocab(rng, 30)]
    item_style = rng.integers(0, n_styles, size=n_items)
    asins = [f"B{d_index:01d}{i:08d}" for i in range(n_items)]
    has_image = rng.random(n_items) >= cfg.missing_image_frac
    has_price = rng.random(n_items) >= cfg.missing_price_frac
    prices = np.exp(world["log_price"][item_style] + rng.normal(0, 0.25, n_items))
    jobs = []
    # mtime=0: gzip would otherwise embed the current time and break byte-identical output
    with open(ddir / f"meta_{domain}.json.gz", "wb") as raw, \
            gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz, \
            io.TextIOWrapper(gz, encoding="utf-8") as fh:
        for i, asin in enumerate(asins):
            s = int(item_style[i])
            words = [style_word[s], nouns[int(rng.integers(len(nouns)))]]
            words += [fillers[int(j)] for j in rng.integers(0, len(fillers), size=int(rng.integers(1, 4)))]
            rec = {"asin": asin, "title": " ".join(words).capitalize(),
                   "brand": brands[int(rng.integers(len(brands)))],
                   "category": [domain, subcats[s % len(subcats)]],
                   "price": _format_price(rng, float(prices[i])) if has_price[i] else ""}
            if has_image[i]:
                ext = "png" if i % 5 == 0 else "jpg"
                rec["imageURLHighRes"] = [f"https://images.example/{asin}.{ext}"]
                jobs.append((str(ddir / "images" / f"{asin}.{ext}"), world["colour"][s] + 6 * d_index,
                             world["fg_colour"][s], int(world["shape"][s]), int(world["texture"][s]),
                             cfg.image_size, int(rng.integers(2**31))))
            fh.write(json.dumps(rec) + "\n")
    if cfg.images:
        list(tqdm(pool.imap(_image_job, jobs, chunksize=64), total=len(jobs),
                  desc=f"images {domain}", unit=" img", mininterval=1, disable=not cfg.progress))
    seqs = simulate_sequences(rng, world, item_style, n_users, cfg)
    with open(ddir / f"{domain}.csv", "w") as fh:
        for u, seq in enumerate(seqs):
            t = 1_300_000_000 + int(rng.integers(0, 100_000_000))
            gaps = rng.exponential(86_400 * 3, size=len(seq)).astype(np.int64)
            gaps[rng.random(len(seq)) < 0.03] = 0  # same-second ties: the packer must order them
            ratings = rng.integers(1, 6, size=len(seq))
            for k, it in enumerate(seq):
                t += int(gaps[k])
                fh.write(f"{asins[it]},A{d_index}{u:09d}X,{ratings[k]}.0,{t}\n")
    with open(ddir / "latent.csv", "w") as fh:  # ground truth, for analyses and tests only
        fh.write("item_id,style\n")
        fh.writelines(f"{a},{int(s)}\n" for a, s in zip(asins, item_style))
    return {"name": domain, "meta": str(ddir / f"meta_{domain}.json.gz"),
            "interactions": str(ddir / f"{domain}.csv"),
            "images": str(ddir / "images") if cfg.images else None,
            "items": n_items, "users": n_users, "interactions_written": int(sum(len(s) for s in seqs))}


def synthesize(cfg: SynthConfig) -> dict:
    names = [(d, "aux") for d in cfg.aux_domains] + [(d, "target") for d in cfg.target_domains]
    if len(set(n for n, _ in names)) != len(names):
        raise ValueError("domain names must be unique")
    looks = target_looks(cfg.seed, cfg.n_styles, cfg.target_render_shift)  # checks the range first
    looks = merged_looks(cfg.seed, cfg.n_styles, cfg.target_render_merge, looks)  # so does this
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    world = shared_world(cfg.seed, cfg.n_styles)
    worlds = {"aux": world, "target": restyled_world(world, looks)}
    # target_looks[s]: the style whose image and price level style s shows in target domains
    manifest = {"format": "amazon2018", "seed": cfg.seed, "target_render_shift": cfg.target_render_shift,
                "target_render_merge": cfg.target_render_merge, "target_looks": [int(s) for s in looks],
                "aux": [], "target": []}
    # spawned (a fork of a threaded caller can hang in the child, see data/pack.py), and dying
    # with this process
    with mp.get_context("spawn").Pool(max(cfg.workers, 1), initializer=die_with_parent,
                                      initargs=(os.getpid(),)) as pool:
        for d_index, (domain, role) in enumerate(names):
            n_items = cfg.items_per_domain if role == "aux" else cfg.target_items_per_domain
            n_users = cfg.users_per_domain if role == "aux" else cfg.target_users_per_domain
            manifest[role].append(write_domain(cfg, worlds[role], domain, d_index, n_items, n_users, out, pool))
    (out / "synth_manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    save_config(cfg, out / "synth_config.yaml")
    return manifest
