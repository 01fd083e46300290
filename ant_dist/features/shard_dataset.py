"""The embedding pass's input side: the items of this process's shards, decoded and tokenised in
DataLoader workers (split out of embed.py, which runs the encoders and writes the tables)."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ant_dist.data.layout import IMAGE_EXTENSIONS
from ant_dist.data.shards import iter_shard_samples
from ant_dist.features.encoders import decode_image


def _image_fields(sample: dict) -> list[str]:
    """Keys holding image bytes: 'jpg', 'png', 'webp', or numbered ones like '1.jpg' (sorted)."""
    return sorted(k for k in sample if not k.startswith("__") and k.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS)


def drop_words(text: str, p: float, seed: tuple) -> str:
    """UniSRec's word drop: each space-separated word is dropped with probability p (the first is
    kept when all would go, so no text becomes empty); `seed` fixes the draw, so a resumed pass
    writes the same text."""
    words = text.split(" ")
    rng = np.random.default_rng(list(seed))
    kept = [w for w, u in zip(words, rng.random(len(words))) if u >= p]
    return " ".join(kept) if kept else words[0]


class ShardItems(IterableDataset):
    """Items of this process's shards, split again across DataLoader workers, done rows skipped."""

    def __init__(self, units: list[tuple[int, str]], feature_dirs: list[str], image_encoder: str,
                 text_encoder: str, max_text_tokens: int, max_images: int, word_drop: float = 0.0):
        self.units, self.feature_dirs, self.word_drop = units, feature_dirs, word_drop
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.max_text_tokens, self.max_images = max_text_tokens, max_images
        self._processor = None
        self._tokenizer = None

    def _lazy(self):
        if self._processor is None:  # loaded in the worker process, not pickled to it
            from transformers import AutoImageProcessor, AutoTokenizer

            self._processor = AutoImageProcessor.from_pretrained(self.image_encoder, local_files_only=True)
            self._tokenizer = AutoTokenizer.from_pretrained(self.text_encoder, local_files_only=True)

    def __iter__(self) -> Iterator[dict]:
        self._lazy()
        info = get_worker_info()
        units = self.units if info is None else self.units[info.id::info.num_workers]
        done = {d: np.load(Path(self.feature_dirs[d]) / "done.npy", mmap_mode="r") for d, _ in units}
        for d, url in units:
            for sample in iter_shard_samples(url):
                meta = json.loads(sample["json"])
                row = int(meta["row"])
                if done[d][row]:
                    continue
                images, failed = [], 0
                for key in _image_fields(sample)[: self.max_images]:
                    img = decode_image(sample[key])
                    if img is None:
                        failed += 1
                    else:
                        images.append(img)
                pixels = self._processor(images=images, return_tensors="pt")["pixel_values"] if images else None
                text = sample["txt"].decode("utf-8")
                if self.word_drop > 0:  # seeded by the domain folder and the row: the item itself
                    text = drop_words(text, self.word_drop, (zlib.crc32(Path(self.feature_dirs[d]).name.encode()), row))
                yield {"domain": d, "row": row, "text": text, "pixels": pixels,
                       "failed_images": failed}

    def collate(self, samples: list[dict]) -> dict:
        self._lazy()
        tokens = self._tokenizer([s["text"] for s in samples], padding=True, truncation=True,
                                 max_length=self.max_text_tokens, return_tensors="pt")
        pix = [s["pixels"] for s in samples if s["pixels"] is not None]
        owner = torch.cat([torch.full((len(s["pixels"]),), i) for i, s in enumerate(samples)
                           if s["pixels"] is not None]) if pix else torch.zeros(0, dtype=torch.long)
        return {"domain": torch.tensor([s["domain"] for s in samples]),
                "row": torch.tensor([s["row"] for s in samples]),
                "tokens": dict(tokens), "pixels": torch.cat(pix) if pix else None, "owner": owner,
                "failed_images": sum(s["failed_images"] for s in samples)}
