import pytest

from ant_dist.config import ConfigError, PackConfig, load_config, parse_cli


def test_yaml_and_overrides_merge(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("domain: Food\nmeta: m.json\ninteractions: r.csv\nmin_core: 3\n")
    cfg = load_config(PackConfig, f, ["min_core=4", "images=imgs"])
    assert (cfg.domain, cfg.min_core, cfg.images, cfg.max_seq_len) == ("Food", 4, "imgs", 50)


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="min_cor"):
        load_config(PackConfig, None, ["domain=a", "meta=b", "interactions=c", "min_cor=3"])


def test_wrong_type_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="min_core"):
        load_config(PackConfig, None, ["domain=a", "meta=b", "interactions=c", "min_core=five"])


def test_a_value_yaml_cannot_read_is_an_error_naming_the_override():
    with pytest.raises(ConfigError, match=r"^'images=\[a': the value is not valid YAML"):
        load_config(PackConfig, None, ["domain=a", "meta=b", "interactions=c", "images=[a"])


def test_missing_required_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="interactions"):
        load_config(PackConfig, None, ["domain=a", "meta=b"])


def test_cli_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_cli(PackConfig, ["--help"], "pack", "desc")
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in PackConfig.__dataclass_fields__:
        assert f"  {name}=" in out


def test_boolean_flag_shorthand_and_unknown_flags(capsys):
    from ant_dist.config import EmbedConfig

    cfg = parse_cli(EmbedConfig, ["text_encoder=t", "image_encoder=i", "--overwrite"], "embed", "")
    assert cfg.overwrite is True
    with pytest.raises(SystemExit) as exc:
        parse_cli(EmbedConfig, ["text_encoder=t", "image_encoder=i", "--shards"], "embed", "")
    assert exc.value.code == 2 and "unknown flag" in capsys.readouterr().err


# every option that names one of a fixed set of values, with the values the code acts on
CHOICE_OPTIONS = {
    "PackConfig": {"format": {"amazon2018", "amazon2023", "table", "recbole"}, "tie_break": {"input", "item"}},
    "FetchConfig": {"format": {"amazon2018", "amazon2023"}},
    "EmbedConfig": {"text_pooling": {"cls", "mean"}},
    "PretrainConfig": {"loss": {"sampled", "exact"}, "sampler": {"uniform", "popularity"},
                       "schedule": {"cosine", "epoch_decay", "constant"}, "precision": {"auto", "bf16", "fp32"},
                       "tracker": {"wandb", "tensorboard", "none"}, "features_on": {"auto", "device", "mmap"}},
    "RelearnConfig": {"mode": {"relearn", "finetune", "scratch", "zeroshot"}, "item_repr": {"irl", "id", "irl+id"},
                      "score": {"", "cos", "dot"}, "loss": {"sampled", "exact"},
                      "select_metric": {f"{m}@{k}" for m in ("recall", "ndcg") for k in (10, 20, 50)}},
    "BaselinesConfig": {"select_metric": {f"{m}@{k}" for m in ("recall", "ndcg") for k in (10, 20, 50)}},
    "ReproduceConfig": {"select_metric": {f"{m}@{k}" for m in ("recall", "ndcg") for k in (10, 20, 50)}},
}
REQUIRED = {"PackConfig": ["domain=D", "meta=m", "interactions=i"], "FetchConfig": ["meta=m", "images=i"],
            "EmbedConfig": ["text_encoder=t", "image_encoder=i"], "BaselinesConfig": ["domain=D"]}


@pytest.mark.parametrize("cls_name,option", [(c, o) for c, opts in CHOICE_OPTIONS.items() for o in opts])
def test_options_with_choices_accept_exactly_them_when_loaded(cls_name, option):
    import ant_dist.config as config

    cls = getattr(config, cls_name)
    for value in sorted(CHOICE_OPTIONS[cls_name][option]):
        assert getattr(load_config(cls, None, [*REQUIRED.get(cls_name, []), f"{option}={value}"]), option) == value
    with pytest.raises(ConfigError, match=rf"^{option} must be one of .*got 'nope'$"):
        load_config(cls, None, [*REQUIRED.get(cls_name, []), f"{option}=nope"])


def test_a_list_option_with_choices_checks_every_element(tmp_path):
    from dataclasses import dataclass

    from ant_dist.config import opt

    @dataclass
    class Toy:
        parts: list = opt(["a"], "parts", choices=("a", "b"))

    assert load_config(Toy, None, ["parts=[a,b,a]"]).parts == ["a", "b", "a"]
    with pytest.raises(ConfigError, match="parts must be one of a, b, got"):
        load_config(Toy, None, ["parts=[a,c]"])


def test_help_shows_the_choices(capsys):
    with pytest.raises(SystemExit):
        parse_cli(PackConfig, ["--help"], "tools/pack.py", "Pack.")
    assert "choices: input, item" in capsys.readouterr().out
