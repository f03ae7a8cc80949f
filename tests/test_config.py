"""The config tree: YAML + dotted overrides, and errors that name the file, the key and a suggestion."""

from __future__ import annotations

import pytest

from vlmtune.config import Config, ConfigError, load_config, parse_override


def test_defaults_are_the_cpu_demo():
    cfg = load_config()
    assert cfg.model.name_or_path == "tiny-phi3v" and cfg.data.catalog.source == "sample"
    assert cfg.cluster.num_workers == 2 and not cfg.cluster.use_gpu


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_steps: 7\n  betas: [0.9, 0.99]\nmodel:\n  lora:\n    r: 4\n")
    cfg = load_config(path, ["train.lr=1e-3", "model.lora.targets=[language_attention]", "cluster.use_gpu=true",
                             "export.dir=null"])
    assert cfg.train.max_steps == 7 and cfg.train.betas == (0.9, 0.99) and cfg.model.lora.r == 4
    assert cfg.train.lr == 1e-3 and cfg.model.lora.targets == ["language_attention"] and cfg.cluster.use_gpu
    assert load_config(path).model_dump() == Config.model_validate(cfg.model_dump() | {
        "train": cfg.train.model_dump() | {"lr": 2e-4}, "model": cfg.model.model_dump() | {
            "lora": cfg.model.lora.model_dump() | {"targets": ["language_attention", "language_mlp"]}},
        "cluster": cfg.cluster.model_dump() | {"use_gpu": False}}).model_dump()


def test_unknown_key_in_file_names_file_key_and_suggestion(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train:\n  max_step: 7\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    assert "unknown key 'train.max_step'; did you mean 'train.max_steps'?" in message


def test_unknown_section_and_override_typos():
    with pytest.raises(ConfigError, match="unknown key 'modle'; did you mean 'model'"):
        load_config(overrides=["modle.name_or_path=x"])
    with pytest.raises(ConfigError, match=r"overrides data\.shards\.sampels_per_shard=3"):
        load_config(overrides=["data.shards.sampels_per_shard=3"])


def test_type_and_range_errors_are_explained():
    with pytest.raises(ConfigError, match=r"train\.max_steps: Input should be greater than or equal to 1"):
        load_config(overrides=["train.max_steps=0"])
    with pytest.raises(ConfigError, match=r"train\.zero_stage: Input should be 0, 1, 2 or 3"):
        load_config(overrides=["train.zero_stage=4"])
    with pytest.raises(ConfigError, match=r"train\.max_steps is a value, not a section"):
        load_config(overrides=["train.max_steps=3", "train.max_steps.x=1"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match=r"quantize_4bit does not work with train\.zero_stage=3"):
        load_config(overrides=["model.lora.quantize_4bit=true", "train.zero_stage=3"])
    with pytest.raises(ConfigError, match="no targets"):
        load_config(overrides=["model.lora.targets=[]"])
    with pytest.raises(ConfigError, match=r"model\.compile does not work with train\.zero_stage=3.*use stage 0 or 2"):
        load_config(overrides=["model.compile=true", "train.zero_stage=3"])
    assert load_config(overrides=["model.compile=true", "train.zero_stage=2"]).model.compile


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_parse_override():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=[x, y]") == (["a"], ["x", "y"])
    assert parse_override("a=") == (["a"], "")
    with pytest.raises(ConfigError, match="not of the form"):
        parse_override("a.b")


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(overrides=["train.max_steps=3", "data.prompt.question=Describe it: price?"])
    assert load_config(cfg.save(tmp_path / "resolved.yaml")) == cfg


def test_num_workers_is_a_count_or_an_elastic_range():
    assert load_config(overrides=["cluster.num_workers=4"]).cluster.worker_range == (4, 4)
    elastic = load_config(overrides=["cluster.num_workers=[2, 8]"]).cluster
    assert elastic.worker_range == (2, 8)
    for bad in ("[4, 2]", "[0, 2]", "0"):
        with pytest.raises(ConfigError, match="num_workers"):
            load_config(overrides=[f"cluster.num_workers={bad}"])
