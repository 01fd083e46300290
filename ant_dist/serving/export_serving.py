"""Serving export: one domain's item table and the user encoder, for scoring with a dot product.

    python -m ant_dist.export_serving model=runs/relearn/model domain=Office out=serving/Office

Writes to `out`:
    item_embeddings.safetensors  item_table (N, d) unit vectors: the scoring table;
                                 item_inputs (N, d) the same items UNnormalised: the user encoder's input
    item_ids.parquet             row -> original item id (row i of both tables is item_ids[i])
    user_encoder.safetensors     the SASRec user model's weights
    user_encoder.json            its config (ant_dist.model.sasrec.SASRecConfig) and how to run it
    serving.json                 what was exported, from what, and the scoring recipe
    README.md                    the recipe in words, with code

Score a user: x = item_inputs[history rows][-max_len:]; h = SASRec(x)[last position];
scores = normalise(h) @ item_table.T (cosines); drop the history rows; take the top k. This is
exactly what `python -m ant_dist.recommend` computes. New items (zero-shot, IRL models): repack
and re-embed the domain and export again with shards=/features= pointing at the new roots.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.torch import save_file

from ant_dist.config import ExportServingConfig, parse_cli
from ant_dist.runtime import staging
from ant_dist.runtime.exit_codes import EXIT_BAD_INPUT, EXIT_OK
from ant_dist.serving.recommend import RecommendError, Scorer, load_scorer

FILES = ("item_embeddings.safetensors", "item_ids.parquet", "user_encoder.safetensors", "user_encoder.json",
         "serving.json", "README.md")


RECIPE = ("x = item_inputs[history_rows][-max_len:] (oldest first); h = user_encoder(x)[-1]; "
          "scores = normalise(h) @ item_table.T; drop the history rows; top k")

README = """# Serving export: {domain}

From model `{model}`, catalog `{shards}` ({n} items, d = {d}), scoring: {scoring}.
{note}
Score a user whose history is a list of original item ids, oldest first:

1. rows = the history ids' rows in `item_ids.parquet` (column `row`, `item_id`);
2. x = `item_inputs`[rows], the most recent {max_len} at most: shape (L, {d});
3. h = the user encoder's output at the LAST position (a causal Transformer: SASRec, config in
   `user_encoder.json`);
4. scores = normalise(h) . `item_table`^T: cosine similarities, one per item (`item_table`
   rows are unit vectors already);
5. leave out the history rows (as evaluation does) and take the k highest.

Items in `item_table` may be served by any dot-product index (steps 4-5). The user encoder is
a small PyTorch module:

```python
import json, torch
from safetensors.torch import load_file
from ant_dist.model.sasrec import SASRec, SASRecConfig
from ant_dist.model.scoring import normalise

items = load_file("item_embeddings.safetensors")
encoder = SASRec(SASRecConfig(**json.load(open("user_encoder.json"))["sasrec"])).eval()
encoder.load_state_dict(load_file("user_encoder.safetensors"))
x = items["item_inputs"][rows][-{max_len}:].unsqueeze(0)            # (1, L, d)
mask = torch.ones(x.shape[:2], dtype=torch.bool)
h = encoder(x, mask)[0, -1]
scores = items["item_table"] @ normalise(h)
```

New items: an IRL model embeds any item from its features, so repack and re-embed the
catalog, then export again (`python -m ant_dist.export_serving ... shards=NEW features=NEW`).
"""


def _occupied(out: Path) -> bool:
    return out.exists() and (not out.is_dir() or any(out.iterdir()))


def export(scorer: Scorer, out_dir: str | Path, model_dir: str, overwrite: bool = False) -> Path:
    """Write the serving files (see the module doc) atomically: to `<out>.tmp`, then swapped in."""
    out = Path(out_dir)
    if _occupied(out) and not overwrite:
        raise RecommendError(f"{out} exists and is not empty; use overwrite=true to replace it")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sasrec = scorer.model.sasrec
    n, d = scorer.table.shape
    meta = {"domain": scorer.domain, "scoring": scorer.scoring, "items": str(n), "dim": str(d)}
    save_file({"item_table": scorer.table.float().cpu().contiguous(),
               "item_inputs": scorer.raw.float().cpu().contiguous()}, str(tmp / FILES[0]), metadata=meta)
    pq.write_table(pa.table({"row": pa.array(range(n), pa.int64()), "item_id": pa.array(scorer.item_ids, pa.string())}),
                   tmp / FILES[1])
    save_file({k: v.detach().float().cpu().contiguous() for k, v in sasrec.state_dict().items()}, str(tmp / FILES[2]))
    encoder = {"class": "ant_dist.model.sasrec.SASRec", "sasrec": dataclasses.asdict(sasrec.cfg),
               "input": "(B, L, d) item_inputs rows of the history, oldest first, right-padded; mask (B, L) True at "
                        "real items", "output": "(B, L, d) states; the user state is the one at the last real item"}
    (tmp / FILES[3]).write_text(json.dumps(encoder, indent=2, sort_keys=True) + "\n")
    manifest = {"model": str(model_dir), "domain": scorer.domain, "shards_dir": str(scorer.shards_dir),
                "items": n, "dim": d, "max_len": sasrec.cfg.max_len, "scoring": scorer.scoring, "note": scorer.note,
                "files": list(FILES), "score": RECIPE}
    (tmp / FILES[4]).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    note = f"\nNote: {scorer.note}.\n" if scorer.note else ""
    (tmp / FILES[5]).write_text(README.format(domain=scorer.domain, model=model_dir, shards=scorer.shards_dir, n=n,
                                              d=d, scoring=scorer.scoring, note=note, max_len=sasrec.cfg.max_len))
    if out.exists() and not out.is_dir():
        out.unlink()
    staging.commit(out, tmp)  # one atomic swap: the previous export stays whole until it
    return out


def main(argv: Optional[list[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = parse_cli(ExportServingConfig, argv, "python -m ant_dist.export_serving", __doc__)
    try:
        if cfg.chunk < 1:
            raise RecommendError(f"chunk must be >= 1, got {cfg.chunk}")
        if _occupied(Path(cfg.out)) and not cfg.overwrite:  # before the item pass
            raise RecommendError(f"{cfg.out} exists and is not empty; use overwrite=true to replace it")
        scorer = load_scorer(cfg.model, cfg.domain, cfg.shards, cfg.features, cfg.device, cfg.chunk, cfg.progress)
        out = export(scorer, cfg.out, cfg.model, cfg.overwrite)
    except RecommendError as exc:
        print(f"export_serving: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if scorer.note:
        print(f"export_serving: note: {scorer.note}", file=sys.stderr)
    print(f"export_serving: {len(scorer.item_ids)} items of {cfg.domain} (d={scorer.table.shape[1]}, "
          f"scoring: {scorer.scoring}) and the user encoder written to {out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
