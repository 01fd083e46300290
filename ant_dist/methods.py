"""The methods a target run can be, in one table (docs/relearn.md explains each).

A method is a label for a (mode, item_repr) pair of `ant_dist.relearn`: the demo and the
reproduction plan turn labels into options, the relearn stage turns its options back into the
label it records in metrics.json, and the report orders and compares runs by it.
"""

from __future__ import annotations

from typing import Optional

MODES = ("relearn", "finetune", "scratch", "zeroshot")
ITEM_REPRS = ("irl", "id", "irl+id", "fused", "nova", "text", "text+id")
# item representations of the multi-modal baselines: trained from scratch only (model/side_info.py)
BASELINE_ITEM_REPRS = ("fused", "nova")

# label -> (mode, item_repr), in the report's row order; labels not listed sort after these, A-Z
METHODS = {
    "ID-SASRec": ("scratch", "id"),
    "zero-shot": ("zeroshot", "irl"),
    "GB": ("scratch", "irl"),
    "FT": ("finetune", "irl"),
    "ReL": ("relearn", "irl"),
    "ANT_e": ("relearn", "irl+id"),
    "SASRec++": ("scratch", "fused"),
    "NOVA": ("scratch", "nova"),
    # UniSRec (model/unisrec.py), from a `pretrain model=unisrec` model: fine-tuned inductively (text
    # only: the paper's "UniSRec", Table III's UniSRec-FT) or transductively (a target ID table too)
    "UniSRec-GB": ("scratch", "text"),
    "UniSRec": ("finetune", "text"),
    "UniSRec-ReL": ("relearn", "text"),
    "UniSRec_e": ("finetune", "text+id"),
}
METHOD_ORDER = tuple(METHODS)
# compared with GB (training from scratch) in the negative-transfer table
TRANSFER_METHODS = ("FT", "ReL", "ANT_e")
BASELINE_METHOD = "GB"

# RecBole 1.2.1's implementations run by `ant_dist.baselines` (docs/baselines.md): label -> RecBole model
RECBOLE_BASELINES = {"NPE": "NPE", "SASRec": "SASRec", "BERT4Rec": "BERT4Rec", "FDSA": "FDSA", "S3-Rec": "S3Rec"}

# The paper's Table II (methods x targets), in its row order; a label with no run is left out.
# ReL is ANT (re-learning the item model), shown under the paper's name.
TABLE2_METHODS = ("NPE", "SASRec", "BERT4Rec", "FDSA", "S3-Rec", "UniSRec", "UniSRec_e", "SASRec++", "NOVA",
                  "ID-SASRec", "ReL", "ANT_e")
DISPLAY_NAMES = {"ReL": "ANT"}
# The paper's Table III: per pre-trained model family, its (GB, FT, ReL) labels
# (UniSRec's FT is the fine-tuned UniSRec of Table II: one run, one label)
TABLE3_FAMILIES = {"UniSRec": ("UniSRec-GB", "UniSRec", "UniSRec-ReL"), "ANT": ("GB", "FT", "ReL")}
# the pre-training a method's `pretrained=` names: label -> `pretrain model=` (ANT's for the others); a
# transfer method starts from it, a GB run takes its architecture (the same capacity as FT and ReL)
PRETRAINED_MODEL = {"UniSRec-GB": "unisrec", "UniSRec": "unisrec", "UniSRec-ReL": "unisrec", "UniSRec_e": "unisrec"}
PRETRAIN_MODELS = ("ant", "unisrec")
# relearn options that only ANT's item model reads, through its text-image fusion term (model/irl.py:
# beta weighs it): other item representations, and ANT's with that term ablated (ablate=[MF]), ignore
# them, so a reproduction grid over one does not multiply their runs (they would be identical)
IRL_ITEM_REPRS = ("irl", "irl+id")
IRL_ONLY_OPTIONS = ("beta",)
FUSION_ABLATION = "MF"


def method_options(label: str) -> list[str]:
    """`relearn` options of a method label (item_repr only where it is not the default, irl)."""
    if label not in METHODS:
        raise ValueError(f"unknown method {label!r}; choose from {list(METHODS)}")
    mode, item_repr = METHODS[label]
    return [f"mode={mode}"] + ([f"item_repr={item_repr}"] if item_repr != "irl" else [])


def method_of(mode: str, item_repr: str) -> Optional[str]:
    """The label of a (mode, item_repr) pair, None for a pair no method names."""
    return next((label for label, pair in METHODS.items() if pair == (mode, item_repr)), None)
