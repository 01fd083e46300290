"""The model a target-domain run starts from, for each adaptation mode (paper section 4.4, Table III).

    relearn   ANT: the pre-trained user model Θ_SASRec-P, frozen; Φ_IRL and Θ_P re-initialised
              and trained on the target (eqs. 16-17)
    finetune  FT: everything pre-trained; the user model frozen, Φ_IRL (and an ID table) trained
    scratch   GB ("ground-built"): the same architecture, initialised at random, all trained
    zeroshot  the pre-trained model as it is; nothing trained

`item_repr` picks the item encoder: irl (ANT), id (a pure-ID SASRec) or irl+id (ANT_e: IRL plus
an ID table over the target catalog; the table is always new, the target's items are new); fused
(SASRec++) and nova (NOVA) are the multi-modal baselines, trained from scratch (model/side_info.py);
text (UniSRec's text adaptor) and text+id (UniSRec_e) start from a `pretrain model=unisrec` model
(model/unisrec.py), in every mode as ANT's item model does from an ANT one.
The architecture (sizes, experts, layers, max_len) comes from the pre-trained model when one is
given, so GB and ID-SASRec have exactly the capacity of the transferred models; training-time
settings (dropouts, beta, gate noise, ablations) come from the run's config.

The score (`score`, docs/model.md) defaults to each method's paper: the dot product for the
SASRec-based models (the pure-ID SASRec as SASRec and RecBole, SASRec++, NOVA), cos/tau for
ANT's item model (the ANT paper, eq. 13); a run that starts from a pre-trained model keeps that
model's score (its user model was trained with it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ant_dist.config import ConfigError, RelearnConfig, check_choices
from ant_dist.methods import BASELINE_ITEM_REPRS, method_of
from ant_dist.model.ant import ANT, EXPERT_FAMILIES, ID_TABLE_SOURCES, ANTConfig
from ant_dist.model.io import load_model
from ant_dist.model.irl import IRLConfig
from ant_dist.model.sasrec import SASRecConfig
from ant_dist.train import TrainError
from ant_dist.train.pretrained_arch import model_configs

# Table IV's switches: the IRLConfig flag each one turns off
ABLATIONS = {"T": "use_text", "I": "use_image", "P": "use_price", "MoE": "use_moe", "MF": "use_fusion"}


def ablation_names(cfg: RelearnConfig) -> list[str]:
    names = [str(a).lstrip("-") for a in cfg.ablate]
    unknown = [a for a in names if a not in ABLATIONS]
    if unknown:
        raise TrainError(f"ablate: unknown switch(es) {unknown}; choose from {list(ABLATIONS)}")
    return names


def method_label(cfg: RelearnConfig) -> str:
    if cfg.method:
        return cfg.method
    base = method_of(cfg.mode, cfg.item_repr) or f"{cfg.mode}/{cfg.item_repr}"
    return " ".join([base] + [f"-{a}" for a in ablation_names(cfg)])


def check_target_config(cfg: RelearnConfig) -> None:
    """Fill `domains` from `domain` and refuse impossible combinations, before anything is loaded."""
    if cfg.domain:
        cfg.domains = [d.strip() for d in cfg.domain.split(",") if d.strip()]
    problems = []
    try:  # a RelearnConfig built in code has not been through load_config
        check_choices(cfg)
    except ConfigError as exc:
        problems.append(str(exc))
    if cfg.mode != "scratch" and not cfg.pretrained:
        problems.append(f"mode={cfg.mode} starts from a pre-trained model: set pretrained=runs/<run>/model")
    if cfg.pretrained and not (Path(cfg.pretrained) / "model_config.json").is_file():
        problems.append(f"pretrained={cfg.pretrained}: not an exported model (no model_config.json); "
                        f"pre-training writes one to runs/<run>/model")
    if cfg.mode == "zeroshot" and cfg.item_repr not in ("irl", "text"):
        problems.append("mode=zeroshot needs item_repr=irl (or text): a target ID table cannot exist before training")
    if cfg.model != "ant":
        problems.append(f"model={cfg.model} is a pre-training option; a target run's model is item_repr (text: "
                        f"UniSRec) and its pre-trained start")
    try:
        names = ablation_names(cfg)
    except TrainError as exc:
        problems.append(str(exc))
        names = []
    if names and cfg.item_repr not in ("irl", "irl+id"):
        problems.append(f"ablations switch parts of ANT's item model off; item_repr={cfg.item_repr} has none")
    if cfg.item_repr in BASELINE_ITEM_REPRS and cfg.mode != "scratch":
        problems.append(f"item_repr={cfg.item_repr} is a baseline trained from scratch (SASRec++ or NOVA): "
                        f"mode=scratch")
    if "MoE" in names and cfg.mode in ("finetune", "zeroshot"):
        problems.append(f"ablate=MoE changes the item model's parameters, so mode={cfg.mode} cannot start from the "
                        f"pre-trained mixture; use mode=relearn or scratch")
    if not cfg.domains:
        problems.append("no target domain: set domain=<name> (several: domain=A,B)")
    if problems:
        raise TrainError("; ".join(problems))


def _architecture(cfg: RelearnConfig, pretrained: ANT | None, text_dim: int,
                  image_dim: int) -> tuple[IRLConfig, SASRecConfig]:
    """IRL and SASRec configs: shapes from the pre-trained model if any, training settings from cfg."""
    flags = {flag: name not in ablation_names(cfg) for name, flag in ABLATIONS.items()}
    if pretrained is not None:
        irl, sasrec = pretrained.cfg.irl, pretrained.cfg.sasrec
        if (irl.text_dim, irl.image_dim) != (text_dim, image_dim):
            raise TrainError(f"the target's features have text/image dims {text_dim}/{image_dim} but {cfg.pretrained} "
                             f"was pre-trained on {irl.text_dim}/{irl.image_dim}: embed the target with the same "
                             f"encoders as the auxiliary domains")
    else:
        irl, sasrec = model_configs(cfg, text_dim, image_dim)
    irl = dataclasses.replace(irl, dropout=cfg.irl_dropout, beta=cfg.beta, gate_noise=cfg.gate_noise, **flags)
    sasrec = dataclasses.replace(sasrec, dropout=cfg.dropout, nova=cfg.item_repr == "nova")
    if pretrained is not None and sasrec.max_len != cfg.max_len:
        cfg.max_len = sasrec.max_len  # the position table's size is the pre-trained one
    return irl, sasrec


def model_score(cfg: RelearnConfig, pretrained: ANT | None) -> str:
    """The run's score: as set, else a pre-trained start's own, else the method paper's (module doc)."""
    if cfg.score:
        return cfg.score
    if pretrained is not None and cfg.mode != "scratch":
        return pretrained.cfg.score
    return "dot" if cfg.item_repr in ("id", *BASELINE_ITEM_REPRS) else "cos"


def build_target_model(cfg: RelearnConfig, features, corpus) -> ANT:
    """The model of `cfg.mode`, with requires_grad set on exactly the parameters that train."""
    pretrained = load_model(cfg.pretrained)[0] if cfg.pretrained else None  # read once: shapes and weights
    irl, sasrec = _architecture(cfg, pretrained, features.text_dim, features.image_dim)
    n_items = corpus.n_items if cfg.item_repr in ID_TABLE_SOURCES else 0
    model = ANT(ANTConfig(item_source=cfg.item_repr, n_items=n_items, score=model_score(cfg, pretrained), irl=irl,
                          sasrec=sasrec))
    if cfg.mode == "scratch":
        return model
    family = EXPERT_FAMILIES.get(pretrained.cfg.item_source)
    # relearn transfers only the user model, so any item model can be re-learned on it; the other modes
    # start from the pre-trained item model, which must be the run's kind
    if cfg.mode != "relearn" and (family is None or family != EXPERT_FAMILIES.get(cfg.item_repr)):
        wanted = {"irl": "pretrain model=ant", "text": "pretrain model=unisrec"}.get(EXPERT_FAMILIES.get(cfg.item_repr))
        raise TrainError(f"{cfg.pretrained} was pre-trained with item_source={pretrained.cfg.item_source}, so mode="
                         f"{cfg.mode} cannot start item_repr={cfg.item_repr} from it"
                         + (f": use a model from `{wanted}`" if wanted else "; use mode=scratch"))
    weights = pretrained.state_dict()
    if cfg.mode == "relearn":
        # only the user model is transferred: the item model and positions are re-learned
        keep = {k: v for k, v in weights.items() if k.startswith("sasrec.")}
        missing = [k for k in model.state_dict() if k.startswith("sasrec.") and k not in keep]
        if missing:
            raise TrainError(f"{cfg.pretrained} has no pre-trained user model weights {missing[:3]}")
        model.load_state_dict(keep, strict=False)
        model.reinit_for_relearning()
    else:
        keep = {k: v for k, v in weights.items() if not k.startswith("id_embedding.")}
        result = model.load_state_dict(keep, strict=False)
        unexpected = list(result.unexpected_keys)
        missing = [k for k in result.missing_keys if not k.startswith("id_embedding.")]
        if unexpected or missing:
            raise TrainError(f"{cfg.pretrained} does not match the model of this run (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        if cfg.mode == "finetune":
            model.freeze_for_finetuning()
        else:  # zeroshot
            for p in model.parameters():
                p.requires_grad_(False)
    return model


def trainable_summary(model: ANT) -> dict[str, str]:
    """Per parameter group: 'trained', 'frozen' or 'absent' (for the run's log)."""
    out = {}
    for name, params in model.param_groups().items():
        if not params:
            out[name] = "absent"
        else:
            states = {p.requires_grad for p in params}
            out[name] = "trained" if states == {True} else "frozen" if states == {False} else "mixed"
    return out

