from pathlib import Path

import pytest

from detector.config import Config, ConfigError, load_config, save_config


def test_defaults_follow_spec():
    c = Config()
    assert c.features.levels == (1, 2, 3, 6)
    assert c.features.train_scales == (480, 576, 688, 864, 1200)
    assert (c.svm.C, c.svm.pos_weight, c.svm.bias) == (0.001, 2.0, 10.0)
    assert c.bbox_reg.lam == 4000.0 and c.test.nms == 0.3


def test_overrides_and_round_trip(tmp_path: Path):
    c = load_config(None, ["finetune.iters=5", "features.test_scales=[480, 688]", "svm.C=1"])
    assert c.finetune.iters == 5 and c.features.test_scales == (480, 688)
    assert isinstance(c.svm.C, float)
    assert load_config(save_config(c, tmp_path, ["prog", "--x"])) == c


@pytest.mark.parametrize(
    "override, match",
    [("finetune.iterz=5", "unknown config key 'finetune.iterz'"),
     ("finetune.iters=abc", "finetune.iters: expected an integer"),
     ("data.use_flipped=1", "expected true/false"),
     ("features.levels=3", "expected a list"),
     ("novalue", "must look like")],
)
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_bad_file_is_named(tmp_path: Path):
    p = tmp_path / "x.yaml"
    p.write_text("svm: {Cc: 1}\n")
    with pytest.raises(ConfigError, match="x.yaml.*unknown config key 'svm.Cc'"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "text, match",
    [("finetune:\n  iters: 5\n  lr: 0.1\n  iters: 7\n", r"duplicate key 'iters' at line 4, column 3 \(first at line 2"),
     ("svm: {C: 1}\nsvm: {bias: 1}\n", "duplicate key 'svm' at line 2"),
     ("svm: {C: 1, C: 2}\n", "duplicate key 'C' at line 1, column 13"),
     ("", "is empty"),
     ("# only a comment\n\n", "is empty"),
     ("- 1\n- 2\n", "top level must be a mapping"),
     ("svm: [\n", "not valid YAML")],
)
def test_bad_yaml_files_are_named(tmp_path: Path, text: str, match: str):
    p = tmp_path / "x.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=f"x.yaml: {match}"):
        load_config(p)


@pytest.mark.parametrize("data", [bytes(range(256)), b"\x00\x01\x02 binary", "svm: {C: 1} # é".encode("latin-1")])
def test_binary_or_non_utf8_file_is_named(tmp_path: Path, data: bytes):
    p = tmp_path / "model.pt"
    p.write_bytes(data)
    with pytest.raises(ConfigError, match="model.pt: not a YAML config"):
        load_config(p)


def test_merge_keys_and_repeated_overrides_are_allowed(tmp_path: Path):
    """A YAML merge (`<<: *anchor`) is meant to be overridden, and --set values apply in order
    after the file, the last one winning (that is how a command line changes a setting)."""
    p = tmp_path / "x.yaml"
    p.write_text("svm: {C: 2}\n")
    assert load_config(p, ["svm.C=3", "svm.C=4"]).svm.C == 4.0
    p.write_text("finetune: {<<: {iters: 3, lr: 0.5}, iters: 4}\n")
    assert (load_config(p).finetune.iters, load_config(p).finetune.lr) == (4, 0.5)
    with pytest.raises(ConfigError, match="override 'finetune=.*duplicate key 'iters'"):
        load_config(None, ["finetune={iters: 3, iters: 4}"])


@pytest.mark.parametrize(
    "key, choices",
    [("backbone.arch", "'zf5', 'vgg16', 'resnet50'"),
     ("proposals.method", "'selective_search', 'edge_boxes', 'file'"),
     ("proposals.mode", "'fast\\+', 'fast', 'quality'"),
     ("pretrain.mode", "'single', 'multi', 'random', 'nospp'"),
     ("pretrain.init", "'spec', 'kaiming'"),
     ("pretrain.optimizer", "'sgd', 'adamw'"),
     ("test.score", "'svm', 'svm\\+softmax'")],
)
def test_string_choices_are_checked_at_load(key: str, choices: str):
    for bad in ("nope", "1", "[svm]"):
        with pytest.raises(ConfigError, match=f"^{key} must be one of {choices}, got "):
            load_config(None, [f"{key}={bad}"])


def test_choices_match_the_library():
    """The config's choices are the ones the code that receives them accepts."""
    import typing

    import proposals
    from detector import backbones, config, pretrain
    from detector.detector import SPPDetector

    def choices(cls, name):
        return typing.get_args(typing.get_type_hints(cls)[name])

    assert choices(config.BackboneConfig, "arch") == backbones.ARCHS
    assert choices(config.ProposalConfig, "mode") == proposals.MODES
    assert choices(config.PretrainConfig, "mode") == pretrain.MODES
    assert choices(config.TestConfig, "score") == SPPDetector.SCORES
