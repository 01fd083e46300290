"""Stage configs: one dataclass per stage, every option with its default, its help text (`--help`
prints them) and, for an option naming one of a fixed set, its allowed values. How they are
declared, loaded and parsed: runtime/options.py (its names are importable from here too).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ant_dist.methods import ITEM_REPRS, METHODS, MODES, PRETRAIN_MODELS, RECBOLE_BASELINES
# a stage imports its config and its parser from one place
from ant_dist.runtime.options import (ConfigError, check_choices, field_help, flag_overrides,  # noqa: F401
                                      format_help, load_config, opt, parse_cli, save_config)


# Allowed values of the options that name a choice: `opt(..., choices=...)` declares them next to the
# default, `load_config` refuses anything else, and the code that acts on them imports them from here.
PACK_FORMATS = ("amazon2018", "amazon2023", "table", "recbole")
FETCH_FORMATS = ("amazon2018", "amazon2023")
TIE_BREAKS = ("input", "item")
TEXT_POOLINGS = ("cls", "mean")
FEATURE_PLACEMENTS = ("auto", "device", "mmap")
LOSSES = ("sampled", "exact")
SAMPLERS = ("uniform", "popularity")
SCHEDULES = ("cosine", "epoch_decay", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
TRACKERS = ("wandb", "tensorboard", "none")
SCORES = ("cos", "dot")
METRIC_KS = (10, 20, 50)  # the cut-offs every evaluation reports (eval/metrics.py)
# the validation metrics that may pick a run's best epoch (and a reproduction's grid point)
SELECT_METRICS = tuple(f"{name}@{k}" for name in ("recall", "ndcg") for k in METRIC_KS)


# ----------------------------------------------------------------------------- synth
@dataclass
class SynthConfig:
    out: str = opt("data/raw", "output folder; one sub-folder per domain in the Amazon 2018 raw format")
    seed: int = opt(0, "random seed; the same seed gives byte-identical output")
    aux_domains: list = opt(["Food", "Movies", "Home", "Clothing"], "names of the auxiliary domains")
    target_domains: list = opt(["Scientific", "Office"], "names of the target domains")
    items_per_domain: int = opt(2000, "items per auxiliary domain")
    target_items_per_domain: int = opt(800, "items per target domain")
    users_per_domain: int = opt(3000, "users per auxiliary domain")
    target_users_per_domain: int = opt(300, "users per target domain (data-poor: ~10x fewer)")
    seq_len_min: int = opt(6, "shortest user sequence generated (before 5-core filtering)")
    seq_len_max: int = opt(30, "longest user sequence generated")
    n_styles: int = opt(24, "latent item styles shared by all domains (drive images, prices, order)")
    interests_per_user: int = opt(3, "styles each user returns to when not following the transition map")
    follow_prob: float = opt(0.75, "probability that the next style follows the shared 2nd-order transition map")
    target_render_shift: float = opt(0.0, "in [0, 1]: fraction of styles (chosen by the seed) whose image and "
                                     "price level, in target domains only, are those of a different style; "
                                     "0 = every domain renders a style alike, 1 = an aux-trained item model "
                                     "misleads on targets (the sequential dynamics stay shared)")
    target_render_merge: float = opt(0.0, "in [0, 1]: fraction of styles (chosen by the seed) merged in pairs "
                                     "that, in target domains only, show one look and price level: 1 = an "
                                     "aux-trained item model is confidently wrong on half the target styles")
    images: bool = opt(True, "draw item images (turn off at paper scale to save disk)")
    image_size: int = opt(64, "side of the square item images, pixels")
    missing_image_frac: float = opt(0.08, "fraction of items without an image")
    missing_price_frac: float = opt(0.1, "fraction of items without a price")
    workers: int = opt(2, "processes used to draw images")
    progress: bool = opt(True, "show progress bars")


# ----------------------------------------------------------------------------- pack
@dataclass
class PackConfig:
    domain: str = opt("???", "domain name, also the output sub-folder under `out`")
    format: str = opt("amazon2018", "raw input format: amazon2018 | amazon2023 | table | recbole "
                      "(RecBole atomic files: meta=<name>.item, interactions=<name>.inter)", choices=PACK_FORMATS)
    meta: str = opt("???", "item metadata file: meta JSON lines (.json/.jsonl, optionally .gz) or, "
                    "for format=table, a CSV/TSV/Parquet with columns id (or item_id), text (or "
                    "title)[, price, image]")
    interactions: str = opt("???", "interactions: amazon2018 ratings CSV (item,user,rating,timestamp) "
                            "or review JSON lines; amazon2023 review JSON lines; table CSV/TSV/Parquet "
                            "with columns user (or user_id), item (or item_id), timestamp (or time)")
    images: Optional[str] = opt(None, "folder of item images named <item_id>.<jpg|jpeg|png|webp>")
    out: str = opt("shards", "output root; the domain is written to <out>/<domain>/")
    columns: dict = opt({}, "format=table: column names of your files, by our name, for names other than the "
                        "accepted ones, e.g. {user: uid, item: iid, timestamp: ts, id: iid, text: name}")
    tie_break: str = opt("input", "order of one user's interactions with the same timestamp: input (their order "
                         "in the file: a stable sort, as RecBole's) | item (by item id)", choices=TIE_BREAKS)
    min_core: int = opt(5, "iterative k-core: keep users and items with at least this many interactions")
    max_seq_len: int = opt(50, "keep each user's most recent N interactions (after k-core)")
    max_text_chars: int = opt(1000, "item texts are cut to this many characters (at a word boundary)")
    price_cap: float = opt(1000.0, "prices are normalised to [0, 100] on a log scale with this cap (USD)")
    max_price: float = opt(1.0e6, "a price above this is treated as absurd: set to null and counted")
    shard_max_items: int = opt(10000, "at most this many items per shard")
    shard_max_bytes: int = opt(256 * 2**20, "at most about this many bytes per shard")
    max_bad_fraction: float = opt(0.2, "fail (exit 2) when more than this fraction of metadata lines "
                                  "or interaction rows is malformed")
    workers: int = opt(2, "processes that validate images and write shards")
    examples_per_reason: int = opt(5, "examples (file:line) kept per skip reason in pack_report.json")
    progress: bool = opt(True, "show progress bars")


# ----------------------------------------------------------------------------- embed
@dataclass
class EmbedConfig:
    shards: str = opt("shards", "root of the packed domains (tools/pack.py output)")
    domains: list = opt([], "domains to embed, in this order; empty = every packed domain under `shards`")
    out: str = opt("features", "output root; tables go to <out>/<domain>/")
    text_encoder: str = opt("???", "local folder of a transformers text model + tokenizer "
                            "(e.g. a saved bert-base-uncased)")
    image_encoder: str = opt("???", "local folder of a transformers image model + image processor "
                             "(e.g. a saved microsoft/swin-base-patch4-window7-224)")
    text_pooling: str = opt("cls", "text features: cls ([CLS] of the last layer, as UniSRec) | mean "
                            "(attention-masked mean, for sentence-transformers models)", choices=TEXT_POOLINGS)
    max_text_tokens: int = opt(128, "texts are truncated to this many tokens")
    text_word_drop: float = opt(0.0, "drop each word of an item's text with this probability before encoding "
                                "(seeded by the item id): UniSRec's word-drop view (its feat2CLS), read by "
                                "`pretrain model=unisrec word_drop_features=<out>`; write it to its own out")
    max_images: int = opt(4, "an item with several images gets the mean of the features of up to this many")
    batch_size: int = opt(64, "items per encoder batch")
    num_workers: int = opt(2, "DataLoader workers per process (decode images, tokenise texts)")
    flush_every: int = opt(8, "batches between flushes of the done mask (work lost at most on a kill)")
    overwrite: bool = opt(False, "discard existing tables instead of resuming or refusing a mismatch")
    progress: bool = opt(True, "progress bar on the main process")


# ----------------------------------------------------------------------------- pretrain
@dataclass
class PretrainConfig:
    # data
    shards: str = opt("shards", "root of the packed domains (tools/pack.py output)")
    features: str = opt("features", "root of the feature tables (ant_dist.embed output)")
    domains: list = opt(["Food", "Movies", "Home", "Clothing"],
                        "auxiliary domains joined into one catalog, in this order (row offsets follow it)")
    out: str = opt("runs", "runs root; this run is <out>/<run_name>/")
    run_name: str = opt("pretrain", "run folder name (also the W&B run name; the W&B id derives from the folder)")
    features_on: str = opt("auto", "where item features live: device (gathered on the training device) | "
                           "mmap (memory-mapped tables, gathered in loader workers) | auto (device when they "
                           "fit in features_device_max_gb)", choices=FEATURE_PLACEMENTS)
    features_device_max_gb: float = opt(1.0, "auto puts features on the device when they take at most this "
                                        "(on CPU 'device' is RAM: raise it on a GPU, where 2.4 GB fit easily)")
    num_workers: int = opt(1, "DataLoader workers per process (build batches, draw negatives, gather mmap features)")
    # model
    model: str = opt("ant", "ant (IRL over text, image and price; the sequential softmax loss) | unisrec "
                     "(UniSRec: its MoE adaptor over the text alone, pre-trained with its sequence-item and "
                     "sequence-sequence contrastive tasks over the global batch; docs/model.md)",
                     choices=PRETRAIN_MODELS)
    item_drop: float = opt(0.2, "model=unisrec: probability that an item of the sequence-sequence task's view is "
                           "dropped (item-drop view) or takes its word-dropped text (word-drop view)")
    item_drop_coefficient: float = opt(0.9, "model=unisrec: probability that a step's view is the item-drop one "
                                       "(else the word-drop one), as UniSRec's")
    word_drop_features: str = opt("", "model=unisrec: features root embedded with text_word_drop > 0, whose text "
                                  "table gives the word-drop view's items (empty: that view reuses the plain texts)")
    hidden: int = opt(256, "hidden size of the item and user models")
    n_layers: int = opt(2, "SASRec self-attention layers")
    n_heads: int = opt(2, "SASRec attention heads")
    ffn_mult: int = opt(1, "SASRec feed-forward width as a multiple of hidden (the authors' ANT code: 1; "
                        "RecBole's SASRec: inner_size 256 = 4 x hidden 64)")
    max_len: int = opt(50, "longest input sequence; longer ones keep their most recent items")
    dropout: float = opt(0.5, "SASRec dropout")
    irl_dropout: float = opt(0.2, "input dropout of the item-model experts")
    n_experts: int = opt(8, "experts per modality (n_h)")
    beta: float = opt(0.3, "weight of the text-image fusion term")
    gate_noise: bool = opt(True, "Gaussian gate noise while training (turn off only for exactness checks)")
    # loss
    loss: str = opt("sampled", "sampled (sampled softmax over the full joint catalog, logQ-corrected) | "
                    "exact (full softmax over every item, chunked)", choices=LOSSES)
    n_negatives: int = opt(1024, "K: negatives each process draws per step (all processes' K x world are shared)")
    sampler: str = opt("popularity", "negative proposal: uniform | popularity ((train count + 1)^sampler_alpha)", choices=SAMPLERS)
    sampler_alpha: float = opt(0.75, "exponent of the popularity proposal")
    in_batch_negatives: bool = opt(False, "also use the batch's targets as negatives (mixture-corrected)")
    gather_negatives: bool = opt(True, "all-gather negatives across processes (gradient flows back to each owner)")
    shared_negatives: bool = opt(False, "every process draws the same K negatives per step and nothing is "
                                 "gathered (a fixed negative set: used to check data-parallel equivalence)")
    tau: float = opt(0.07, "softmax temperature of the cosine score (not used by score=dot)")
    align_weight: float = opt(1e-3, "lambda, weight of the text-image alignment loss R_c (over the step's items); "
                              "model=unisrec: the weight of the sequence-sequence task (UniSRec's lambda)")
    exact_chunk: int = opt(8192, "catalog rows per chunk of the exact loss and of the evaluation")
    # optimisation
    batch_size: int = opt(2048, "sequences per optimizer step over ALL processes (each takes an equal share)")
    lr: float = opt(1e-3, "peak learning rate (AdamW)")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    schedule: str = opt("cosine", "cosine (linear warmup, cosine to min_lr_ratio) | epoch_decay (warmup, then "
                        "lr x epoch_decay per epoch) | constant (warmup, then flat)", choices=SCHEDULES)
    warmup_steps: int = opt(50, "linear warmup steps")
    min_lr_ratio: float = opt(0.1, "cosine ends at lr x this")
    epoch_decay: float = opt(0.9, "per-epoch factor of the epoch_decay schedule")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    max_epochs: int = opt(10, "stop after this many epochs")
    max_steps: int = opt(0, "stop after this many optimizer steps (0 = no limit)")
    precision: str = opt("auto", "auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32", choices=PRECISIONS)
    compile: bool = opt(False, "torch.compile the item model and the user model (inductor, dynamic shapes; "
                        "the first steps pay the compilation)")
    seed: int = opt(0, "seed of the data order, negatives, dropout and initialisation")
    # evaluation, checkpoints, monitoring
    eval_every: int = opt(0, "validate every N steps (0 = at the end of each epoch, -1 = never: benchmarks)")
    eval_users: int = opt(2000, "validation users per domain (a fixed random subset; 0 = all)")
    exclude_history: bool = opt(True, "remove a user's earlier items from the ranking (RecBole: false)")
    checkpoint_every: int = opt(500, "save a checkpoint every N steps (and at the end; 0 = only at the end)")
    keep_checkpoints: int = opt(2, "keep the newest K checkpoints")
    resume: str = opt("auto", "auto (continue from the newest complete checkpoint if there is one) | never "
                      "(refuse a run folder that has checkpoints) | a checkpoint folder")
    tracker: str = opt("wandb", "wandb (offline when no API key is configured) | tensorboard | none", choices=TRACKERS)
    wandb_project: str = opt("ant-dist", "W&B project")
    log_every: int = opt(10, "log training figures every N steps")
    progress: bool = opt(True, "tqdm progress line on the main process")
    trace_batches: bool = opt(False, "write each process's trained sequence ids per step to trace/ (for checks)")
    fail_at_step: int = opt(0, "testing aid: make the loss non-finite at this step (0 = never)")


# ----------------------------------------------------------------------------- relearn
@dataclass
class RelearnConfig(PretrainConfig):
    """Adaptation to a target domain: every pre-training option, plus the ones below.

    The architecture (sizes, experts, layers, max_len) comes from the pre-trained model when one is
    given; training-time settings (dropouts, beta, gate noise, ablations) come from this config.
    """

    pretrained: str = opt("", "exported pre-trained model folder (runs/<run>/model); required except for "
                          "mode=scratch, where it only fixes the architecture")
    domain: str = opt("", "target domain(s), comma-separated (sets `domains`)")
    mode: str = opt("relearn", "relearn (re-learn the item model and positions, freeze the rest of the user "
                    "model) | finetune (start from everything pre-trained, freeze the user model) | scratch "
                    "(the same architecture trained on the target only) | zeroshot (evaluate, no training)", choices=MODES)
    item_repr: str = opt("irl", "irl (ANT) | id (pure-ID SASRec) | irl+id (ANT_e: IRL plus a target ID table) | "
                         "fused (SASRec++) | nova (NOVA): these two with mode=scratch | text (UniSRec's text "
                         "adaptor) | text+id (UniSRec_e: plus a target ID table); finetune and zeroshot "
                         "start from a model of the same family (pretrain model=ant for irl*, model=unisrec for "
                         "text*)",
                         choices=ITEM_REPRS)
    score: str = opt("", "how a user state scores an item: cos (cos/tau, the ANT paper) | dot (SASRec's dot "
                     "product, tau unused) | empty: the method's paper (dot for item_repr=id, fused, nova, cos "
                     "otherwise; a pre-trained model's own score for relearn/finetune/zeroshot)",
                     choices=("",) + SCORES)
    ablate: list = opt([], "Table IV ablations: any of T (no text), I (no image), P (no price), MoE (one linear "
                       "map instead of the experts), MF (no text-image fusion)")
    method: str = opt("", "label in reports (empty: ReL, FT, GB, ANT_e, ID-SASRec or zero-shot from mode and "
                      "item_repr, with the ablations appended)")
    select_metric: str = opt("recall@10", "validation metric that picks the best epoch (pooled over the target "
                             "users)", choices=SELECT_METRICS)
    patience_steps: int = opt(200, "early stopping: stop after this many optimizer steps without a better "
                              "validation metric (counted in steps, so tiny targets are not stopped at epoch 0; "
                              "0 = never stop early)")
    min_epochs: int = opt(5, "early stopping never stops before this many epochs")
    train_users_fraction: float = opt(1.0, "train on the sequences of this fraction of the target's users (all "
                                      "users are still validated and tested: data-efficiency studies)")
    train_users_seed: int = opt(0, "seed of the user subset (the same for every method, so runs pair up)")
    # defaults that differ from pre-training (the target is small: exact loss, every user evaluated)
    domains: list = opt([], "target domains (or use domain=)")
    run_name: str = opt("relearn", "run folder name under `out` (also the W&B run name)")
    loss: str = opt("exact", "exact (full softmax over the target catalog, as the paper) | sampled", choices=LOSSES)
    batch_size: int = opt(256, "sequences per optimizer step over all processes")
    schedule: str = opt("constant", "cosine | epoch_decay | constant (after warmup)", choices=SCHEDULES)
    warmup_steps: int = opt(0, "linear warmup steps")
    max_epochs: int = opt(200, "upper bound on epochs; early stopping usually ends the run first")
    eval_users: int = opt(0, "validation users per domain (0 = all: early stopping sees every user)")
    checkpoint_every: int = opt(0, "save a checkpoint every N steps (0 = only at the end and on a stop signal)")
    keep_checkpoints: int = opt(1, "keep the newest K checkpoints")
    num_workers: int = opt(0, "DataLoader workers per process (0: build batches in the training process)")


# ----------------------------------------------------------------------------- serving export
@dataclass
class ExportServingConfig:
    model: str = opt("???", "exported model folder (<run>/model: model.safetensors + model_config.json)")
    domain: str = opt("???", "domain whose catalog is exported")
    out: str = opt("???", "output folder")
    shards: Optional[str] = opt(None, "root of the packed domains; default: the one the model was trained on")
    features: Optional[str] = opt(None, "root of the feature tables of `shards`; default: the model's")
    overwrite: bool = opt(False, "replace an existing output folder")
    device: str = opt("auto", "auto (cuda when available) | cpu | cuda | cuda:N")
    chunk: int = opt(8192, "catalog rows per item-model batch")
    progress: bool = opt(True, "progress bar over the catalog")


# ----------------------------------------------------------------------------- RecBole export
@dataclass
class ExportRecboleConfig:
    domain_dir: str = opt("???", "packed domain folder (tools/pack.py output), e.g. shards/Food; may be given "
                          "as the first argument")
    out: str = opt("???", "output root (RecBole's data_path): files go to <out>/<name>/<name>.inter, .item")
    name: str = opt("", "RecBole dataset name (sub-folder and file stem); empty = the domain folder's name")
    progress: bool = opt(True, "show progress bars")


# ----------------------------------------------------------------------------- RecBole baselines
@dataclass
class BaselinesConfig:
    domain: str = opt("???", "target domain: a packed folder under `shards`")
    model: str = opt("", f"one baseline: {', '.join(RECBOLE_BASELINES)}", choices=("", *RECBOLE_BASELINES))
    models: list = opt([], "several baselines, run one after another (instead of model=)",
                       choices=tuple(RECBOLE_BASELINES))
    shards: str = opt("shards", "root of the packed domains (tools/pack.py output)")
    features: str = opt("features", "root of the feature tables: FDSA and S3-Rec read the domain's text table")
    out: str = opt("runs", "runs root; a baseline's run is <out>/<run_name>/")
    run_name: str = opt("", "run folder; default baselines/<domain>/<label>/seed<seed> (a {model} in it is "
                        "replaced by the label, for models=[...])")
    hidden: int = opt(64, "d: item embedding and hidden size (paper: searched in 64, 128, 300)")
    max_len: int = opt(50, "most recent items of a user's input (RecBole's MAX_ITEM_LIST_LENGTH; relearn's max_len)")
    inner_size: int = opt(256, "feed-forward width of the Transformer baselines (RecBole's default)")
    n_layers: int = opt(2, "Transformer layers")
    n_heads: int = opt(2, "attention heads")
    dropout: Optional[float] = opt(None, "hidden and attention dropout (NPE: its dropout_prob); default: RecBole's "
                                   "for the model (0.5; BERT4Rec 0.2, NPE 0.3)")
    lr: float = opt(1e-3, "Adam learning rate (paper: searched in 3e-4, 1e-3, 3e-3, 1e-2)")
    batch_size: int = opt(2048, "training batch (paper: 2,048)")
    epochs: int = opt(300, "most training epochs")
    patience: int = opt(10, "early stopping: stop after this many epochs without a better validation metric")
    select_metric: str = opt("recall@10", "our validation metric that picks the best epoch (as relearn's)",
                             choices=SELECT_METRICS)
    exclude_history: bool = opt(True, "remove a user's earlier items from the ranking (RecBole: false)")
    s3rec_pretrain_epochs: int = opt(10, "S3-Rec's self-supervised pre-training epochs before fine-tuning")
    s3rec_attributes: int = opt(0, "S3-Rec item attributes: k-means clusters of the text table (0: sqrt(items), "
                                "clamped to 8..256); each item gets its 3 nearest clusters")
    seed: int = opt(0, "seed of RecBole's initialisation and batches")
    device: str = opt("auto", "auto (cuda when available) | cpu | cuda")
    eval_batch: int = opt(256, "users per scoring batch")
    tracker: str = opt("wandb", "wandb (offline without an API key) | none", choices=("wandb", "none"))
    wandb_project: str = opt("ant-dist", "W&B project")
    progress: bool = opt(True, "progress bars")


# ----------------------------------------------------------------------------- report
ALL_METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20", "recall@50", "ndcg@50")  # the test metrics every run records


@dataclass
class ReportConfig:
    paths: list = opt("???", "run folders holding metrics.json, metrics.json files, or folders searched recursively")
    out: str = opt("report", "output folder (report.md, report.json, PNGs)")
    metrics: str = opt(",".join(ALL_METRICS), "comma-separated test metrics for the tables")
    alpha: float = opt(0.05, "significance level of the paired t-tests")


# ----------------------------------------------------------------------------- reproduce
@dataclass
class ReproduceConfig:
    work_dir: str = opt("paper", "working folder: images/, shards/, features/, runs/, report/, timings.jsonl")
    raw_dir: str = opt("data/amazon2018", "folder holding the downloaded raw files named in `files`")
    aux_domains: list = opt(["Food", "Movies", "Home", "Clothing"], "auxiliary domains (pre-training)")
    targets: list = opt(["Scientific", "Pantry", "Instruments", "Arts", "Office"], "target domains (re-learning)")
    files: dict = opt({}, "per domain: {meta: <meta file>, ratings: <ratings CSV>}, relative to raw_dir "
                      "(Amazon 2018: meta_<Category>.json.gz and <Category>.csv)")
    fetch: bool = opt(True, "download the images with tools/fetch_images.py (false: use `image_dirs`)")
    fetch_min_ratings: int = opt(5, "fetch only the images of items with at least this many rows in the ratings "
                                 "file (at most pack's min_core: k-core filtering drops the others anyway); "
                                 "0 = every item of the meta file")
    fetch_options: dict = opt({"parallel": 16}, "tools/fetch_images.py options (parallel, max_items, rate_per_host, "
                              "url_prefix_from/url_prefix_to for a mirror or a test server, ...)")
    image_dirs: dict = opt({}, "with fetch=false: per domain, a local folder of <item_id>.<ext> images "
                           "(a domain without one is packed without images)")
    pack_config: str = opt("configs/pack.yaml", "base config of tools/pack.py (relative paths: to the repository)")
    pack: dict = opt({}, "tools/pack.py options over pack_config")
    embed_config: str = opt("configs/embed.yaml", "base config of ant_dist.embed")
    embed: dict = opt({}, "ant_dist.embed options (encoders, pooling, batch) over embed_config")
    pretrain_config: str = opt("configs/pretrain.yaml", "base config of ant_dist.pretrain")
    pretrain: dict = opt({}, "ant_dist.pretrain options over pretrain_config")
    relearn_config: str = opt("configs/relearn.yaml", "base config of ant_dist.relearn")
    relearn: dict = opt({}, "ant_dist.relearn options over relearn_config; a list value is a grid axis "
                        "(beta: [0.1, 0.3]); for a list-typed option (ablate) a list of lists is; a run leaves "
                        "out of its point what it ignores (beta without ANT's fusion term: other item models, "
                        "ablate MF) or its method_options set, and equal points run once")
    methods: list = opt(["ReL", "FT", "GB", "ANT_e", "ID-SASRec"], f"methods to run: {', '.join(METHODS)} or a "
                        "label of method_options")
    method_options: dict = opt({}, "extra methods: label -> relearn options, e.g. {'ReL -T': [mode=relearn, "
                               "'ablate=[T]']}")
    unisrec_pretrain: dict = opt({}, "ant_dist.pretrain options of UniSRec's pre-training over `pretrain` (runs when "
                                 "a UniSRec method is in `methods`; model=unisrec is set), e.g. {lr: 1e-3}")
    unisrec_word_drop: float = opt(0.15, "UniSRec's word drop: the auxiliary domains are embedded again with this "
                                   "text_word_drop into <work_dir>/features_worddrop (0: no such table; the "
                                   "sequence-sequence view drops items only)")
    seeds: list = opt([0, 1, 2], "re-learning seeds (and the baselines': the same seeds pair their users)")
    select_metric: str = opt("recall@10", "validation metric that selects the epoch and the grid point",
                             choices=SELECT_METRICS)
    baselines: list = opt(list(RECBOLE_BASELINES), "RecBole baselines of Table II, each run on every target x seed "
                          "by `python -m ant_dist.baselines` (empty: none)", choices=tuple(RECBOLE_BASELINES))
    baseline_options: dict = opt({}, "ant_dist.baselines options of every baseline (hidden, lr, epochs, batch_size, "
                                 "max_len, ...) and, under a baseline's label, its own over them, e.g. "
                                 "{batch_size: 2048, NPE: {hidden: 128, lr: 1e-3}}")
    baseline_target_options: dict = opt({}, "per target, options over baseline_options in the same form (common, "
                                        "then per label), e.g. {Scientific: {NPE: {hidden: 300, lr: 3e-3}}}")
    report_dir: str = opt("", "report folder (default <work_dir>/report); selection.json goes there too")
    report_metrics: str = opt("", "metrics of the report tables (empty: the report's default six)")
    alpha: float = opt(0.05, "significance level of the report's paired t-tests")
    resources: dict = opt({}, "per stage (fetch, pack, embed, baselines, pretrain, relearn, select, report): "
                          "nodes, gpus "
                          "(per node), processes (per node), cpus, mem, time, partition: sbatch options; "
                          "est_hours (per task) and est_disk_gb (whole stage): the dry run's estimate")


# ----------------------------------------------------------------------------- demo
@dataclass
class DemoConfig:
    out: str = opt("demo", "working folder: raw/, shards/ (and later features/, runs/) go under it")
    seed: int = opt(0, "seed of the synthetic world")
    items_per_domain: int = opt(2000, "items per auxiliary domain")
    users_per_domain: int = opt(3000, "users per auxiliary domain")
    workers: int = opt(2, "processes for drawing images and writing shards")
    progress: bool = opt(True, "show progress bars")
    processes: int = opt(2, "training processes for the pre-training stage")
    pretrain_steps: int = opt(1000, "pre-training steps (about 4 minutes on 2 CPU cores; 0 stops after the features)")
    target: str = opt("Scientific", "target domain of the adaptation stage")
    methods: list = opt(["GB", "FT", "ReL", "ANT_e", "ID-SASRec", "zero-shot"],
                        "adaptation methods to run on the target (empty: stop after pre-training)")


# ----------------------------------------------------------------------------- fetch images
@dataclass
class FetchConfig:
    format: str = opt("amazon2018", "metadata format: amazon2018 (imageURLHighRes, else imageURL) | amazon2023 "
                      "(images[]: the MAIN entry, else the first; hi_res, else large)", choices=FETCH_FORMATS)
    meta: str = opt("???", "item metadata: JSON lines, optionally .gz (the file given to tools/pack.py)")
    images: str = opt("???", "output folder: <item_id>.<jpg|png|webp>, the `images=` of tools/pack.py")
    parallel: int = opt(16, "concurrent downloads (threads)")
    max_items: int = opt(0, "trial run: only the first N items that have an image URL (0 = all)")
    rate_per_host: float = opt(50.0, "requests per second per host, token bucket (0 = no limit)")
    burst_per_host: int = opt(16, "requests a host may get at once before the rate applies")
    timeout: float = opt(10.0, "seconds: connect timeout and longest wait for any bytes")
    total_timeout: float = opt(120.0, "seconds: longest time one download may take")
    retries: int = opt(3, "retries after a 5xx/408/429, a timeout, a truncated body or a connection error")
    backoff: float = opt(1.0, "seconds: retry k waits a random time in [0, backoff x 2^k] (full jitter)")
    max_backoff: float = opt(60.0, "seconds: longest wait before a retry (also caps Retry-After)")
    max_bytes: int = opt(10 * 2**20, "refuse a body larger than this (checked while it streams)")
    url_prefix_from: str = opt("", "rewrite URLs that start with this prefix ...")
    url_prefix_to: str = opt("", "... to start with this one instead (mirrors, tests: a loopback server)")
    user_agent: str = opt("ant-dist-fetch/0.1", "User-Agent header")
    examples_per_reason: int = opt(5, "examples (item id: URL: detail) kept per outcome in the report")
    progress: bool = opt(True, "show a progress bar")


# ----------------------------------------------------------------------------- recommend
@dataclass
class RecommendConfig:
    model: str = opt("???", "exported model folder (<run>/model: model.safetensors + model_config.json)")
    domain: str = opt("???", "domain whose catalog is ranked")
    history: str = opt("???", "the user's items, ORIGINAL item ids, oldest first, comma-separated")
    k: int = opt(10, "how many items to return")
    shards: Optional[str] = opt(None, "root of the packed domains; default: the one the model was trained on "
                                "(a newer pack of the domain here adds its new items)")
    features: Optional[str] = opt(None, "root of the feature tables of `shards`; default: the model's")
    exclude_history: bool = opt(True, "leave the history's items out of the ranking")
    json: bool = opt(False, "print JSON instead of a table")
    device: str = opt("auto", "auto (cuda when available) | cpu | cuda | cuda:N")
    chunk: int = opt(8192, "catalog rows per item-model batch")
    progress: bool = opt(True, "progress bar over the catalog")


# ----------------------------------------------------------------------------- transferability
@dataclass
class TransferabilityConfig:
    model: str = opt("???", "exported pre-trained model folder (runs/<run>/model)")
    features: str = opt("features", "root of the feature tables (ant_dist.embed output), one folder per domain")
    shards: str = opt("shards", "root of the packed domains (the feature tables are checked against them)")
    targets: list = opt("???", "target domains, e.g. [Scientific,Office]")
    auxiliary: list = opt([], "auxiliary domains; empty = the model's pre-training domains (model_config.json)")
    out: str = opt("report/transferability", "output folder")
    seed: int = opt(0, "seed of the item subsamples, class balancing, splits and classifiers")
    max_items_per_domain: int = opt(10000, "embed at most this many random items per domain (0 = all)")
    exclude_missing: bool = opt(True, "drop items without an image (image) or without a price (price): their "
                                "placeholder embedding is constant, so it would measure missingness, not content")
    min_items_per_class: int = opt(20, "skip a (pair, modality) cell with fewer usable items per domain")
    c_grid: list = opt([0.01, 0.1, 1.0, 10.0, 100.0], "logistic-regression C values tried on the validation split")
    max_iter: int = opt(2000, "L-BFGS iterations per classifier")
    batch_size: int = opt(4096, "items per item-model batch")
    device: str = opt("auto", "auto (cuda when available) | cpu | cuda")
    progress: bool = opt(True, "show progress bars")
