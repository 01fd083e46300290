"""The model architecture from a stage's options, and the options a pre-trained model decides:
refuse a differing one, record the ones that ran.

With `pretrained=`, the model's shapes come from the model, so `hidden=64` on the command line
cannot apply to a 256-wide model. Ignoring it silently (and recording `hidden: 64` in the run's
config) would make the run folder lie about what ran. So an architecture option that the user
set (in the YAML file or as key=value) and that differs from the model's is refused, naming both
values; equal values are fine; and the config is then set to the model's values, so the saved
`relearn_config.yaml` and metrics.json record what actually ran.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

from omegaconf import OmegaConf

from ant_dist.model.ant import EXPERT_FAMILIES
from ant_dist.model.io import model_fix
from ant_dist.model.irl import IRLConfig
from ant_dist.model.sasrec import SASRecConfig
from ant_dist.runtime.safe_read import check_safetensors, read_json
from ant_dist.train import TrainError


def model_configs(cfg, text_dim: int, image_dim: int) -> tuple[IRLConfig, SASRecConfig]:
    """The item and user model configs that a stage config's options describe (every option the
    two models read, training settings such as dropout included)."""
    irl = IRLConfig(text_dim=text_dim, image_dim=image_dim, hidden=cfg.hidden, n_heads=cfg.n_experts,
                    dropout=cfg.irl_dropout, beta=cfg.beta, gate_noise=cfg.gate_noise)
    sasrec = SASRecConfig(hidden=cfg.hidden, n_layers=cfg.n_layers, n_heads=cfg.n_heads, max_len=cfg.max_len,
                          dropout=cfg.dropout, ffn_mult=cfg.ffn_mult)
    return irl, sasrec


# option -> (part of the model config, its field there)
ARCHITECTURE = {"hidden": ("sasrec", "hidden"), "n_layers": ("sasrec", "n_layers"),
                "n_heads": ("sasrec", "n_heads"), "max_len": ("sasrec", "max_len"),
                "ffn_mult": ("sasrec", "ffn_mult"),
                "n_experts": ("irl", "n_heads")}


def explicit_options(argv: Sequence[str]) -> set[str]:
    """Option names set in the --config file or as key=value (what the user asked for)."""
    args, keys = list(argv), set()
    if "--config" in args and args.index("--config") + 1 < len(args):
        i = args.index("--config")
        node = OmegaConf.load(args[i + 1])  # already parsed once by parse_cli: it loads
        keys |= set(node.keys()) if OmegaConf.is_dict(node) else set()
        del args[i:i + 2]
    keys |= {a.split("=", 1)[0].strip() for a in args if "=" in a and not a.startswith("-")}
    return keys


def adopt_architecture(cfg, explicit: Iterable[str]) -> Optional[dict]:
    """Check `cfg.pretrained`'s files, refuse differing explicit architecture options, and set the
    config's architecture to the model's. Returns the model config (None without pretrained=)."""
    if not cfg.pretrained:
        return None
    d = Path(cfg.pretrained)
    config = read_json(d / "model_config.json", "model config", model_fix(d))
    check_safetensors(d / "model.safetensors", model_fix(d))
    ant = config.get("ant")
    if not isinstance(ant, dict):
        raise TrainError(f"{d / 'model_config.json'}: not an ANT model config (no 'ant'); {model_fix(d)}")
    has_irl = str(ant.get("item_source", "irl")) in EXPERT_FAMILIES
    model_values = {}
    for option, (part, name) in ARCHITECTURE.items():
        if part == "irl" and not has_irl:
            continue  # a model without experts: n_experts cannot differ from anything
        try:
            # models saved before ffn_mult was an option had the width it defaulted to then
            model_values[option] = ant[part].get(name, 1) if option == "ffn_mult" else ant[part][name]
        except (KeyError, TypeError):
            raise TrainError(f"{d / 'model_config.json'}: no {part}.{name}; {model_fix(d)}") from None
    explicit = set(explicit)
    differ = [f"{k}={getattr(cfg, k)!r} but the model has {k}={v!r}" for k, v in model_values.items()
              if k in explicit and getattr(cfg, k) != v]
    if differ:
        raise TrainError(f"pretrained={cfg.pretrained} fixes the architecture: {'; '.join(differ)}. Drop the "
                         f"option (or give the model's value), or use mode=scratch without pretrained= to train "
                         f"another architecture")
    for k, v in model_values.items():
        setattr(cfg, k, v)
    return config
