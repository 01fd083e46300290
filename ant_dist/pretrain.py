"""Pre-training over the auxiliary domains: the IRL item model and the SASRec user model.

    python -m ant_dist.pretrain --config configs/pretrain.yaml [key=value ...]      (one process)
    accelerate launch --num_processes N -m ant_dist.pretrain --config configs/pretrain.yaml
    accelerate launch --config_file configs/accelerate/zero2.yaml -m ant_dist.pretrain ...  (DeepSpeed)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m ant_dist.pretrain ...  (CPU)

Output: <out>/<run_name>/ with checkpoints/, model/ (for re-learning), metrics.jsonl, the
resolved config and the W&B run (offline when no API key is configured). Rerunning the same
command continues from the newest checkpoint (resume=auto), on any number of processes.

Exit codes: 0 done, 2 bad input or configuration (the message says what), 3 non-finite loss
or gradient (the last good checkpoint is kept), 75 stopped by SIGTERM/SIGUSR1 after writing a
checkpoint. The loop lives in ant_dist/train/ and is shared with re-learning.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from ant_dist.config import PretrainConfig, parse_cli
from ant_dist.train.entry import is_main_process, run_stage
from ant_dist.train.stage import Stage


def main(argv: Optional[list[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = parse_cli(PretrainConfig, argv, "python -m ant_dist.pretrain", __doc__)

    def done(summary: dict) -> None:
        if not is_main_process():
            return
        val = summary.get("validation", {})
        shown = ", ".join(f"{k.split('/')[1]} NDCG@10 {v:.4f}" for k, v in val.items() if k.endswith("ndcg@10"))
        print(f"pretrain: done: {summary['step']} steps on {summary['world_size']} process(es) in "
              f"{summary['seconds']:.0f}s; {shown}; model: {os.path.join(cfg.out, cfg.run_name, 'model')}")

    return run_stage(cfg, Stage("pretrain"), done)


if __name__ == "__main__":
    sys.exit(main())
