"""Recommendations from an exported model: the top-k items of one domain for a history of item ids.

    python -m ant_dist.recommend model=runs/relearn/model domain=Office history=B00A,B00B,B00C
    python -m ant_dist.recommend model=... domain=... history=... shards=shards_v2 features=features_v2

Scoring is evaluation's (ant_dist/train/evaluate.py): every catalog item through the item model
once, as the model's score vectors (unit vectors for score=cos); the user state is SASRec's state
at the last history item, read from the UNnormalised embeddings of the history; the score is the
model's (docs/model.md): the cosine of the two, or their dot product for score=dot.

Items added after training (zero-shot): repack and re-embed the domain, then pass those roots as
shards= / features=. An IRL model (item_source=irl) scores any item from its features alone. An ID
table only knows the catalog it was trained on: an `id` model refuses another catalog, an
`irl+id` model scores it with its IRL part only and says so.

Exit codes: 0 done, 2 bad input (unknown history ids, a catalog the model cannot score, ...).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from ant_dist.config import RecommendConfig, parse_cli
from ant_dist.data.layout import CATALOG
from ant_dist.data.shards import iter_shard_samples, shard_paths
from ant_dist.features.catalog import CatalogFeatures, open_tables
from ant_dist.features.feature_table import read_manifest
from ant_dist.model.ant import ANT
from ant_dist.model.io import load_model
from ant_dist.model.sasrec import SASRec
from ant_dist.model.scoring import score_vectors
from ant_dist.runtime.exit_codes import EXIT_BAD_INPUT, EXIT_OK, BadInput


class RecommendError(RuntimeError):
    """Bad input: the message says what; the command exits with code 2."""


# ----------------------------------------------------------------------------- the scorer
@dataclass
class Scorer:
    """One domain's catalog through one model: everything needed to rank any history."""

    model: ANT
    domain: str
    item_ids: list[str]            # catalog row -> original item id
    row_of: dict[str, int]         # original item id -> catalog row
    raw: torch.Tensor              # (N, d) item embeddings as the user model reads them
    table: torch.Tensor            # (N, d) the scoring table: score vectors (unit vectors for score=cos)
    scoring: str                   # irl | id | irl+id | irl-only (an irl+id model on another catalog)
    new: Optional[np.ndarray]      # (N,) True = not in the catalog the model was trained on; None = unknown
    note: str                      # why the scoring is what it is, when that needs saying
    shards_dir: Path

    @property
    def max_len(self) -> int:
        return self.model.cfg.sasrec.max_len

    def rows(self, history: list[str]) -> list[int]:
        unknown = [i for i in history if i not in self.row_of]
        if unknown:
            shown = ", ".join(unknown[:20]) + (f" (and {len(unknown) - 20} more)" if len(unknown) > 20 else "")
            raise RecommendError(f"history items not in the catalog of {self.domain!r} ({self.shards_dir}): {shown}")
        return [self.row_of[i] for i in history]

    @torch.no_grad()
    def user_state(self, rows: list[int]) -> torch.Tensor:
        """SASRec's state at the last of the (most recent max_len) history rows, (d,)."""
        rows = rows[-self.max_len:]
        seq = self.raw[torch.as_tensor(rows, device=self.raw.device)].unsqueeze(0)
        mask = torch.ones(1, len(rows), dtype=torch.bool, device=seq.device)
        return SASRec.last(self.model.user_states(seq, mask), mask)[0]

    @torch.no_grad()
    def scores(self, rows: list[int]) -> torch.Tensor:
        """The model's score (cosine, or dot product for score=dot) of every catalog item, (N,)."""
        return self.table @ score_vectors(self.user_state(rows), self.model.cfg.score)


def _catalog(shards_dir: Path) -> list[str]:
    if not (shards_dir / CATALOG).is_file():
        raise RecommendError(f"{shards_dir} is not a packed domain (no {CATALOG}); pack it with tools/pack.py")
    return [str(x) for x in pq.read_table(shards_dir / CATALOG, columns=["item_id"]).column("item_id").to_pylist()]


def _trained_ids(config: dict, domain: str) -> Optional[list[str]]:
    """The item ids of the catalog the model was trained on, when that catalog can still be read
    (and still has the trained size: a repack in place would show other items)."""
    domains, sizes = config.get("domains", []), config.get("items_per_domain", [])
    if domain not in domains or len(sizes) != len(domains) or not config.get("shards"):
        return None
    path = Path(config["shards"]) / domain
    try:
        ids = _catalog(path)
    except RecommendError:
        return None
    return ids if len(ids) == sizes[domains.index(domain)] else None


def id_table_offset(config: dict, domain: str, item_ids: list[str]) -> tuple[Optional[int], str]:
    """Where the domain's rows start in the model's ID table, or (None, why) when this catalog
    is not the one the table was trained on (rows are item-id ordered: a new item shifts them)."""
    domains, sizes = config.get("domains", []), config.get("items_per_domain", [])
    if domain not in domains or len(sizes) != len(domains):
        return None, f"the model's ID table covers the domains {domains}, not {domain!r}"
    i = domains.index(domain)
    if len(item_ids) != sizes[i]:
        return None, (f"the catalog of {domain!r} has {len(item_ids)} items but the model's ID table was trained "
                      f"on {sizes[i]}: items added or removed since training have no ID embedding")
    trained = _trained_ids(config, domain)
    if trained is not None and trained != item_ids:
        return None, f"the catalog of {domain!r} holds other items than the one the ID table was trained on"
    return int(sum(sizes[:i])), ""


def _features(model: ANT, config: dict, domain: str, shards_root: Path, features_root: Path, n_items: int,
              device: torch.device) -> CatalogFeatures:
    try:
        tables = open_tables(features_root, shards_root, [domain], [n_items])
    except BadInput as exc:
        raise RecommendError(str(exc)) from None
    irl = model.cfg.irl
    manifest = tables[0]["manifest"]
    dims = (manifest["text"]["dim"], manifest["image"]["dim"])
    if dims != (irl.text_dim, irl.image_dim):
        raise RecommendError(f"{features_root / domain} holds text/image features of dims {dims}, the model reads "
                             f"{(irl.text_dim, irl.image_dim)}: embed the catalog with the model's encoders")
    # the model's own features tell which encoders it was trained with (when still readable)
    trained = read_manifest(Path(config["features"]) / config["domains"][0]) \
        if config.get("features") and config.get("domains") else None
    for enc in ("text", "image"):
        want = (trained or {}).get(enc, {}).get("fingerprint")
        if want and manifest[enc].get("fingerprint") != want:
            raise RecommendError(f"{features_root / domain} was embedded with another {enc} encoder "
                                 f"({manifest[enc].get('path')}) than the model was trained with "
                                 f"({trained[enc].get('path')}): re-embed with the model's encoders")
    return CatalogFeatures(tables, "mmap", device)


@torch.no_grad()
def item_embeddings(model: ANT, features: Optional[CatalogFeatures], n_items: int, scoring: str,
                    id_offset: int, chunk: int, device: torch.device, progress: bool) -> torch.Tensor:
    """(n_items, d) UNnormalised item embeddings of the catalog, in the given scoring mode."""
    out = []
    for start in tqdm(range(0, n_items, chunk), desc="items", unit=" chunks", disable=not progress):
        rows = torch.arange(start, min(start + chunk, n_items), device=device)
        v = model.irl(*features.gather(rows)).embedding if scoring != "id" else 0
        if scoring in ("id", "irl+id"):
            v = v + model.id_embedding(rows + id_offset)
        out.append(v.float())
    return torch.cat(out) if out else torch.zeros(0, model.cfg.sasrec.hidden, device=device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RecommendError(f"device={name!r}: not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecommendError(f"device={name!r}: CUDA is not available here")
    return device


def load_scorer(model_dir: str, domain: str, shards: Optional[str] = None, features: Optional[str] = None,
                device: str = "cpu", chunk: int = 8192, progress: bool = False) -> Scorer:
    """The model, the domain's catalog and its scoring table (see the module doc for the rules)."""
    try:
        model, config = load_model(model_dir)
    except BadInput as exc:
        raise RecommendError(str(exc)) from None
    except (RuntimeError, KeyError, TypeError) as exc:  # weights or config of another shape
        raise RecommendError(f"{model_dir}: model.safetensors does not match model_config.json: {exc}") from None
    source = model.cfg.item_source
    baseline = {"fused": "SASRec++", "nova": "NOVA", "text": "UniSRec", "text+id": "UniSRec_e"}.get(source)
    if baseline:
        raise RecommendError(f"{model_dir} is a {baseline} baseline (item_source={source}), trained for the "
                             f"report's comparison; recommendations and serving exports are for ANT's models "
                             f"(item_source irl, id or irl+id)")
    dev = resolve_device(device)
    model.eval().to(dev)
    shards_root = Path(shards or config.get("shards") or "shards")
    features_root = Path(features or config.get("features") or "features")
    item_ids = _catalog(shards_root / domain)
    if not item_ids:
        raise RecommendError(f"the catalog of {domain!r} ({shards_root / domain}) is empty")
    scoring, offset, note = source, 0, ""
    if "id" in source:
        found, why = id_table_offset(config, domain, item_ids)
        if found is None and source == "id":
            raise RecommendError(f"cannot score this catalog with an ID model: {why}. An ID model scores only the "
                                 f"items it was trained on; items added after training need an IRL model "
                                 f"(item_source=irl), which scores them from their features alone")
        if found is None:
            scoring, note = "irl-only", f"{why}; scoring with the IRL part only (ID embeddings ignored)"
        else:
            offset = found
            if offset + len(item_ids) > model.id_embedding.num_embeddings:
                raise RecommendError(f"the model's ID table has {model.id_embedding.num_embeddings} rows, too few "
                                     f"for {domain!r} at offset {offset}: model_config.json does not match the weights")
    feats = None if scoring == "id" else _features(model, config, domain, shards_root, features_root,
                                                    len(item_ids), dev)
    raw = item_embeddings(model, feats, len(item_ids), scoring, offset, chunk, dev, progress)
    trained = _trained_ids(config, domain)
    if trained is not None:
        seen = set(trained)
        new = np.array([i not in seen for i in item_ids])
    else:  # a domain the model never saw is all new; an unreadable training catalog: unknown
        new = np.ones(len(item_ids), dtype=bool) if domain not in config.get("domains", []) else None
    return Scorer(model, domain, item_ids, {i: r for r, i in enumerate(item_ids)}, raw,
                  score_vectors(raw, model.cfg.score), scoring,
                  new, note, shards_root / domain)


# ----------------------------------------------------------------------------- ranking
def top_k(scores: torch.Tensor, k: int, exclude: list[int]) -> list[tuple[int, float]]:
    """(row, score) of the k best rows, best first; ties go to the lower row; `exclude` never shows."""
    s = scores.detach().float().cpu().clone()
    if exclude:
        s[torch.as_tensor(sorted(set(exclude)))] = -torch.inf
    order = torch.sort(s, descending=True, stable=True).indices
    keep = order[torch.isfinite(s[order])][:max(k, 0)]
    return [(int(r), float(s[r])) for r in keep]


def recommend(scorer: Scorer, history: list[str], k: int = 10, exclude_history: bool = True) -> list[dict]:
    """The top-k items for a history of original item ids: [{rank, item_id, row, score, new}]."""
    if not history:
        raise RecommendError("history is empty: give at least one item id")
    rows = scorer.rows(history)
    best = top_k(scorer.scores(rows), k, rows if exclude_history else [])
    return [{"rank": i + 1, "item_id": scorer.item_ids[r], "row": r, "score": s,
             "new": None if scorer.new is None else bool(scorer.new[r])} for i, (r, s) in enumerate(best)]


def item_texts(shards_dir: Path, rows: list[int]) -> dict[int, str]:
    """Texts of some catalog rows, read from only the shards that hold them."""
    wanted = set(rows)
    if not wanted:
        return {}
    shard_of = pq.read_table(shards_dir / CATALOG, columns=["shard"]).column("shard").to_numpy()
    shards = {int(shard_of[r]) for r in wanted}
    urls = [u for u in shard_paths(shards_dir) if int(Path(u).stem.split("-")[1]) in shards]
    found: dict[int, str] = {}
    for sample in iter_shard_samples(urls):
        row = int(json.loads(sample["json"])["row"])
        if row in wanted:
            found[row] = sample["txt"].decode("utf-8")
    return found


def parse_history(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _cut(text: str, width: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


def format_table(items: list[dict]) -> str:
    idw = max([len("item_id")] + [len(it["item_id"]) for it in items])
    lines = [f"{'rank':>4}  {'item_id':<{idw}}  {'score':>7}  text"]
    for it in items:
        mark = "*" if it["new"] else " "
        lines.append(f"{it['rank']:>4}  {it['item_id']:<{idw}}  {it['score']:>7.4f}{mark} {_cut(it['text'])}")
    return "\n".join(lines)


def _history_as_typed(argv: list[str]) -> list[str]:
    """Quote `history=` values: OmegaConf reads values as YAML, which turns an id such as
    0123 into the number 83 (octal); a JSON string is a YAML string that keeps it as typed."""
    return [f"history={json.dumps(a[len('history='):])}" if a.startswith("history=") else a for a in argv]


def main(argv: Optional[list[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = _history_as_typed(list(sys.argv[1:] if argv is None else argv))
    cfg = parse_cli(RecommendConfig, args, "python -m ant_dist.recommend", __doc__)
    try:
        if cfg.k < 1 or cfg.chunk < 1:
            raise RecommendError(f"k and chunk must be >= 1 (k={cfg.k}, chunk={cfg.chunk})")
        history = parse_history(cfg.history)
        scorer = load_scorer(cfg.model, cfg.domain, cfg.shards, cfg.features, cfg.device, cfg.chunk, cfg.progress)
        items = recommend(scorer, history, cfg.k, cfg.exclude_history)
        texts = item_texts(scorer.shards_dir, [it["row"] for it in items])
    except RecommendError as exc:
        print(f"recommend: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for it in items:
        it["text"] = texts.get(it["row"], "")
    if scorer.note:
        print(f"recommend: note: {scorer.note}", file=sys.stderr)
    if cfg.json:
        print(json.dumps({"model": cfg.model, "domain": cfg.domain, "scoring": scorer.scoring, "note": scorer.note,
                          "catalog_items": len(scorer.item_ids), "history": history, "items": items}, indent=2))
    else:
        n_new = "unknown" if scorer.new is None else int(scorer.new.sum())
        print(f"# {cfg.domain}: {len(scorer.item_ids)} items ({n_new} not seen in training, marked *), "
              f"scoring: {scorer.scoring}, history: {len(history)} items")
        print(format_table(items))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
