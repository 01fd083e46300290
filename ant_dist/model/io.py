"""An exported model folder: `model.safetensors` + `model_config.json`, written atomically and read
back with nothing executed on load. Training writes it; re-learning, serving, evaluation and the
transferability probes read it (none of them needs the training loop to load a model)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ant_dist.model.ant import ANT, ANTConfig
from ant_dist.model.irl import IRLConfig
from ant_dist.model.sasrec import SASRecConfig
from ant_dist.runtime.safe_read import UnreadableFile, read_json, read_weights

WEIGHTS = "model.safetensors"
CONFIG = "model_config.json"


def model_fix(d: Path) -> str:
    return f"export it again (pre-training or re-learning writes {d.name}/ at its end), or point at another model"


def state_dict_on_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def export_model(model: ANT, out_dir: str | Path, extra: dict) -> None:
    """<out>/model.safetensors + model_config.json: enough to rebuild the model with `load_model`."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state_dict_on_cpu(model), str(tmp / WEIGHTS))
    config = {"ant": dataclasses.asdict(model.cfg), **extra}
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def load_model_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an exported model folder (safetensors: no code runs on load)."""
    path = Path(model_dir) / WEIGHTS
    if not path.is_file():
        raise UnreadableFile(f"{model_dir} holds no exported model ({path.name} is missing)")
    return read_weights(path, model_fix(Path(model_dir)))


def load_model(model_dir: str | Path) -> tuple[ANT, dict]:
    """The exported model (weights on CPU) and its config (with the pre-training catalog's domains)."""
    d = Path(model_dir)
    if not (d / CONFIG).is_file() or not (d / WEIGHTS).is_file():
        raise UnreadableFile(f"{d} is not an exported model (needs {WEIGHTS} and {CONFIG})")
    config = read_json(d / CONFIG, "model config", model_fix(d))
    try:
        a = config["ant"]
        # models exported before the score option existed all scored by cosine
        cfg = ANTConfig(item_source=a["item_source"], n_items=a["n_items"], score=a.get("score", "cos"),
                        irl=IRLConfig(**a["irl"]), sasrec=SASRecConfig(**a["sasrec"]))
    except (KeyError, TypeError, AttributeError) as exc:
        raise UnreadableFile(f"{d / CONFIG}: not an ANT model config ({type(exc).__name__}: {exc}); "
                             f"{model_fix(d)}") from None
    model = ANT(cfg)
    weights = read_weights(d / WEIGHTS, model_fix(d))
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise UnreadableFile(f"{d / WEIGHTS}: does not match {CONFIG} "
                             f"({str(exc).strip().splitlines()[0]}); {model_fix(d)}") from None
    return model, config
