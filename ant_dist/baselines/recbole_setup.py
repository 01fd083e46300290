"""RecBole 1.2.1 set up on an `export_recbole` folder: its config, dataset, loaders, model and
trainer, with what it takes to run it beside our numpy and torch (docs/baselines.md lists each):

- RecBole's Config writes CUDA_VISIBLE_DEVICES from its `gpu_id` for the whole process; we hand
  it the current value and put the variable back afterwards, so a Slurm or user setting survives.
- Nothing is pickled: RecBole's trainer would save checkpoints with torch.save (a pickled config
  inside) and load them with torch.load; we never call its fit/evaluate paths that do, keep the
  best weights in memory and write them with safetensors. S3-Rec's fine-tuning stage would
  torch.load its pre-trained file in __init__; we build it in the pre-training stage and switch it.
- RecBole's Config sets numpy's old aliases (np.float = np.float_, ...), and its metrics use them;
  numpy 2 removed np.float_, np.complex_ and np.unicode_ themselves, so the Config's own line
  fails. We define those three (as float64, complex128, str_) before RecBole runs.
- RecBole's Dataset._remap counts the tokens of each token_seq value with `Series.agg(len)`; pandas
  3 applies that to the whole column (one number), so the split of the remapped ids fails. We
  replace that one method by the same code counting with `Series.map(len)`.
- RecBole's Config parses sys.argv for `--key=value` options; it sees an empty command line.
- RecBole's Trainer opens a TensorBoard writer under ./log_tensorboard of the working directory;
  we point it into the run folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator

import torch

from ant_dist.runtime.exit_codes import BadInput

RECBOLE_VERSION = "1.2.1"


class BaselineError(BadInput, ValueError):
    """Bad input for a baseline run: the message says what and how to fix it."""


def import_recbole():
    """RecBole, or a clear error saying how to install it."""
    try:
        import recbole
    except ImportError:
        raise BaselineError("the RecBole baselines need RecBole 1.2.1: pip install '.[baselines]' "
                            "(docs/baselines.md)") from None
    if recbole.__version__ != RECBOLE_VERSION:
        raise BaselineError(f"RecBole {recbole.__version__} is installed; the baselines are set up for "
                            f"{RECBOLE_VERSION} (pip install recbole=={RECBOLE_VERSION} --no-deps)")
    return recbole


@contextlib.contextmanager
def _cuda_visible_devices_kept() -> Iterator[None]:
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


@contextlib.contextmanager
def _without_command_line() -> Iterator[None]:
    """RecBole's Config also reads `--key=value` options from sys.argv: ours are not for it."""
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        yield
    finally:
        sys.argv = argv


def use_cuda(device: str) -> bool:
    if device not in ("auto", "cpu", "cuda"):
        raise BaselineError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BaselineError("device=cuda but no CUDA device is available")
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())


def _numpy2_aliases() -> None:
    import numpy as np

    for old, new in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
        if old not in np.__dict__:
            setattr(np, old, new)


def _remap_token_seqs(self, remap_list):
    """RecBole 1.2.1's Dataset._remap, with `.map(len)` where it had `.agg(len)` (module docstring)."""
    import numpy as np
    import pandas as pd
    from recbole.utils import FeatureType

    if len(remap_list) == 0:
        return
    tokens, split_point = self._concat_remaped_tokens(remap_list)
    new_ids_list, mp = pd.factorize(tokens)
    new_ids_list = np.split(new_ids_list + 1, split_point)
    mp = np.array(["[PAD]"] + list(mp))
    token_id = {t: i for i, t in enumerate(mp)}
    for (feat, field, ftype), new_ids in zip(remap_list, new_ids_list):
        if field not in self.field2id_token:
            self.field2id_token[field] = mp
            self.field2token_id[field] = token_id
        if ftype == FeatureType.TOKEN:
            feat[field] = new_ids
        elif ftype == FeatureType.TOKEN_SEQ:
            feat[field] = np.split(new_ids, np.cumsum(feat[field].map(len).to_numpy())[:-1])


def _compatible() -> None:
    """The fixes RecBole 1.2.1 needs beside numpy 2 and pandas 3 (module docstring), once."""
    from recbole.data.dataset import dataset as dataset_module

    _numpy2_aliases()
    dataset_module.Dataset._remap = _remap_token_seqs


def recbole_config(model: str, dataset: str, data_path: Path, yaml_file: Path, options: dict, cuda: bool):
    """RecBole's Config for `model` on <data_path>/<dataset>, the export's yaml then `options`."""
    import_recbole()
    _compatible()
    from recbole.config import Config

    gpu_id = os.environ.get("CUDA_VISIBLE_DEVICES", "0") if cuda else ""
    with _cuda_visible_devices_kept(), _without_command_line():
        config = Config(model=model, dataset=dataset, config_file_list=[str(yaml_file)],
                        config_dict={"data_path": str(data_path), "gpu_id": gpu_id, **options})
    # RecBole's own logging (dataset statistics, per-epoch lines) stays quiet: our console lines and
    # metrics.jsonl carry what a run did
    logging.getLogger().setLevel(logging.WARNING)
    return config


def build_data(config):
    """(dataset, train, valid, test loaders), seeded as RecBole's quick start does."""
    from recbole.data import create_dataset, data_preparation
    from recbole.utils import init_seed

    init_seed(config["seed"], config["reproducibility"])
    with warnings.catch_warnings():
        # RecBole fills missing values with chained in-place fillna, which pandas 3 warns is a no-op; the
        # fields loaded here (ids and cluster tokens) have no missing value, so nothing is lost
        warnings.filterwarnings("ignore", module=r"recbole\.data")
        warnings.filterwarnings("ignore", message=".*ChainedAssignment.*")
        dataset = create_dataset(config)
        train, valid, test = data_preparation(config, dataset)
    return dataset, train, valid, test


def build_model(config, dataset):
    from recbole.utils import get_model, init_seed

    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    return get_model(config["model"])(config, dataset).to(config["device"])


def build_trainer(config, model, tensorboard_dir: Path):
    """RecBole's trainer for `model` (its optimizer and `_train_epoch`), TensorBoard in the run folder."""
    from recbole.trainer import trainer as trainer_module
    from recbole.utils import get_trainer

    original = trainer_module.get_tensorboard
    trainer_module.get_tensorboard = lambda logger: _writer(tensorboard_dir)
    try:
        return get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
    finally:
        trainer_module.get_tensorboard = original


def _writer(path: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(path))
