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
