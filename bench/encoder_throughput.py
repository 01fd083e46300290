"""Raw encoder throughput of paper-sized frozen encoders (random weights) on one device.

    python bench/encoder_throughput.py --device cuda          # bert-base texts/s, swin-base images/s
    python bench/encoder_throughput.py --device cpu --steps 2

bert-base (12 layers, 768) on 64-token texts and swin-base (patch4-window7-224) on 224x224
images, weights and inputs cast to bf16 on GPU (as a frozen encoder can be), inference mode. Goal on one H100/H200: >= 8,000 texts/s and
>= 2,500 images/s. Prints figures and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def timed(fn, steps: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    from transformers import BertConfig, BertModel, SwinConfig, SwinModel

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--text-batch", type=int, default=1024)
    p.add_argument("--image-batch", type=int, default=256)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=None, help="the JSON (default bench/results/encoders_<device>.json)")
    p.add_argument("--tiny", action="store_true", help="2-layer, 32-wide encoders: checks the path, not a figure")
    args = p.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = True
    if args.tiny:
        text_cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        image_cfg = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8])
    else:  # bert-base and swin-base (patch4-window7-224)
        text_cfg = BertConfig()
        image_cfg = SwinConfig(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32])
    bert = BertModel(text_cfg).to(dev, dtype).eval()
    swin = SwinModel(image_cfg).to(dev, dtype).eval()
    ids = torch.randint(1000, 30000, (args.text_batch, args.tokens), device=dev)
    mask = torch.ones_like(ids)
    pixels = torch.randn(args.image_batch, 3, 224, 224, device=dev, dtype=dtype)
    with torch.inference_mode():
        t_text = timed(lambda: bert(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0], args.steps, dev)
        t_img = timed(lambda: swin(pixel_values=pixels).pooler_output, args.steps, dev)
    res = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "dtype": str(dtype),
           "texts_per_s": round(args.text_batch / t_text, 1), "images_per_s": round(args.image_batch / t_img, 1),
           "text_batch": args.text_batch, "tokens": args.tokens, "image_batch": args.image_batch,
           "encoders": "tiny" if args.tiny else "bert-base, swin-base"}
    print(json.dumps(res, indent=2))
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"encoders_{dev.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
