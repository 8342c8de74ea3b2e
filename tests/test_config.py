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
