import ast
import dataclasses
import re
import string
from pathlib import Path

import pytest

from detector.config import (
    MIN_INPUT_SIDE, PACKAGED_CONFIGS, TAIL_UNITS, WIDTH_ARCHS, Config, ConfigError, check_config, config_from_dict, load_config,
    packaged_configs, resolve_config_path, save_config,
)

REPO = Path(__file__).resolve().parents[1]


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
    [("data.format", "'voc', 'coco'"),
     ("backbone.arch", "'zf5', 'zf5_bn', 'vgg16', 'resnet50', 'resnet18', 'mobilenet_v3'"),
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
    from detector.data import splits
    from detector.detector import SCORES

    def choices(cls, name):
        return typing.get_args(typing.get_type_hints(cls)[name])

    assert choices(config.DataConfig, "format") == splits.FORMATS
    assert choices(config.BackboneConfig, "arch") == backbones.ARCHS
    assert choices(config.ProposalConfig, "mode") == proposals.MODES
    assert set(choices(config.ProposalConfig, "method")) == {*proposals.METHODS, "file"}
    assert choices(config.PretrainConfig, "mode") == pretrain.MODES
    assert choices(config.TestConfig, "score") == SCORES


# (overrides, the start of the message line): every field's rule, and each relation between fields
BAD_VALUES = [
    # data
    ("data.root=", "data.root must be non-empty, got ''"),
    ("data.train_split=", "data.train_split must be non-empty"),
    ("data.test_split=", "data.test_split must be non-empty"),
    ("data.val_split=trainval", "data.val_split must be '' or a split other than train_split and test_split"),
    ("data.val_split=test", "data.val_split must be '' or a split other than"),
    ("data.val_fraction=1.5", "data.val_fraction must be in [0, 1), got 1.5"),
    ("data.val_fraction=1", "data.val_fraction must be in [0, 1)"),
    ("data.val_fraction=-0.1", "data.val_fraction must be in [0, 1)"),
    ("data.classes=[cat, dog, cat]", "data.classes must be free of repeats, got ['cat', 'dog', 'cat']"),
    ("data.classes=[cat, '']", "data.classes[1] must be non-empty"),
    ("data.max_train_images=-2", "data.max_train_images must be >= 0, got -2"),
    ("data.max_test_images=-1", "data.max_test_images must be >= 0, got -1"),
    # proposals
    ("proposals.min_size=-1", "proposals.min_size must be >= 0"),
    ("proposals.max_boxes=-1", "proposals.max_boxes must be >= 0, got -1"),
    ("proposals.method=file", "proposals.train_file must be a proposal file (or test_file, for testing only)"),
    ("proposals.method=edge_boxes", "proposals.edge_model must be the path of model.yml.gz"),
    ("proposals.workers=0", "proposals.workers must be >= 1"),
    ("proposals.ss_side=0", "proposals.ss_side must be >= 1"),
    ("proposals.grid_min=0", "proposals.grid_min must be > 0"),
    ("proposals.grid_stride=-0.5", "proposals.grid_stride must be > 0"),
    ("proposals.grid_stride=.inf", "proposals.grid_stride must be a finite number, got inf"),
    ("proposals.grid_aspect_ratios=[]", "proposals.grid_aspect_ratios must be non-empty"),
    ("proposals.grid_aspect_ratios=[1, 0]", "proposals.grid_aspect_ratios[1] must be > 0"),
    # backbone
    ("backbone.width_mult=-0.5", "backbone.width_mult must be > 0"),
    ("backbone.width_mult=.nan", "backbone.width_mult must be a finite number, got nan"),
    (["backbone.arch=vgg16", "backbone.width_mult=0.5"], "backbone.width_mult must be 1.0 for arch 'vgg16'"),
    (["backbone.arch=resnet50", "backbone.width_mult=2"], "backbone.width_mult must be 1.0 for arch 'resnet50'"),
    (["backbone.arch=resnet18", "backbone.width_mult=0.25", "backbone.weights=imagenet"],
     "backbone.width_mult must be 1.0 with weights 'imagenet'"),
    ("backbone.weights=", "backbone.weights must be non-empty"),
    ("backbone.weights=imagenet", "backbone.weights must be 'none' or a state_dict file for arch 'zf5'"),
    # pretrain
    ("pretrain.sizes=[]", "pretrain.sizes must be non-empty"),
    ("pretrain.sizes=[64, 0]", "pretrain.sizes[1] must be >= 1"),
    ("pretrain.sizes=[24, 64]", "pretrain.sizes[0] must be >= 31 px (a smaller input leaves zf5 no conv5 cell)"),
    ("pretrain.epochs=0", "pretrain.epochs must be >= 1"),
    ("pretrain.batch_size=0", "pretrain.batch_size must be >= 1"),
    ("pretrain.lr=-1", "pretrain.lr must be > 0"),
    ("pretrain.momentum=1", "pretrain.momentum must be in [0, 1)"),
    ("pretrain.weight_decay=-0.0001", "pretrain.weight_decay must be >= 0"),
    ("pretrain.fc_dim=0", "pretrain.fc_dim must be >= 1"),
    ("pretrain.levels=[]", "pretrain.levels must be non-empty"),
    ("pretrain.levels=[1, 0]", "pretrain.levels[1] must be >= 1"),
    ("pretrain.crops_per_image=0", "pretrain.crops_per_image must be >= 1"),
    ("pretrain.bg_per_image=-1", "pretrain.bg_per_image must be >= 0"),
    ("pretrain.max_images=-1", "pretrain.max_images must be >= 0"),
    ("pretrain.seed=-1", "pretrain.seed must be in [0, 4294967295]"),
    ("pretrain.jitter=-0.1", "pretrain.jitter must be >= 0"),
    ("pretrain.context=0.5", "pretrain.context must be >= 1"),
    ("pretrain.warmup_iters=-1", "pretrain.warmup_iters must be >= 0"),
    ("pretrain.clip_grad=-1", "pretrain.clip_grad must be >= 0"),
    ("pretrain.val_max_images=-1", "pretrain.val_max_images must be >= 0"),
    ("pretrain.eval_min_side=0", "pretrain.eval_min_side must be >= 1"),
    ("pretrain.eval_min_side=16", "pretrain.eval_min_side must be >= 31 px"),
    ("pretrain.workers=0", "pretrain.workers must be >= 1"),
    ("pretrain.bn_images=-1", "pretrain.bn_images must be >= 0"),
    # features
    ("features.train_scales=[-100]", "features.train_scales[0] must be >= 1, got -100"),
    ("features.train_scales=[]", "features.train_scales must be non-empty"),
    ("features.train_scales=[480, 20]", "features.train_scales[1] must be >= 31 px"),
    ("features.test_scales=[0]", "features.test_scales[0] must be >= 1, got 0"),
    ("features.test_scales=[]", "features.test_scales must be non-empty"),
    (["backbone.arch=vgg16", "features.test_scales=[8]"], "features.test_scales[0] must be >= 16 px"),
    ("features.max_size=-1", "features.max_size must be >= 0"),
    ("features.max_size=1000", "features.max_size must be 0 (no cap) or >= the largest scale (1200), got 1000"),
    ("features.levels=[0]", "features.levels[0] must be >= 1"),
    ("features.target_side=-64", "features.target_side must be > 0, got -64.0"),
    ("features.target_side=0", "features.target_side must be > 0"),
    # head
    ("head.fc_dim=0", "head.fc_dim must be >= 1"),
    ("head.dropout=1", "head.dropout must be in [0, 1)"),
    ("pretrain.dropout=-0.1", "pretrain.dropout must be in [0, 1)"),
    # finetune
    ("finetune.iters=-5", "finetune.iters must be >= 1, got -5"),
    ("finetune.iters=0", "finetune.iters must be >= 1"),
    ("finetune.lr=-0.001", "finetune.lr must be > 0"),
    ("finetune.lr_steps=[60000, 30000]", "finetune.lr_steps must be strictly increasing, got [60000, 30000]"),
    ("finetune.lr_steps=[-1, 5]", "finetune.lr_steps[0] must be >= 0"),
    ("finetune.momentum=-0.1", "finetune.momentum must be in [0, 1)"),
    ("finetune.weight_decay=-1", "finetune.weight_decay must be >= 0"),
    ("finetune.batch_size=0", "finetune.batch_size must be >= 1"),
    ("finetune.fg_fraction=0", "finetune.fg_fraction must be in (0, 1]"),
    ("finetune.fg_fraction=1.5", "finetune.fg_fraction must be in (0, 1]"),
    ("finetune.fg_iou=1.1", "finetune.fg_iou must be in (0, 1]"),
    ("finetune.bg_iou_low=-0.1", "finetune.bg_iou_low must be in [0, 1)"),
    ("finetune.bg_iou_low=0.5", "finetune.bg_iou_low must be < bg_iou_high (0.5), got 0.5"),
    ("finetune.bg_iou_high=0.6", "finetune.bg_iou_high must be <= fg_iou (0.5), got 0.6"),
    ("finetune.val_every=-1", "finetune.val_every must be >= 0"),
    ("finetune.val_batches=0", "finetune.val_batches must be >= 1"),
    ("finetune.chunk_iters=0", "finetune.chunk_iters must be >= 1"),
    ("finetune.chunk_images=0", "finetune.chunk_images must be >= 1"),
    ("finetune.seed=-3", "finetune.seed must be in [0, 4294967295]"),
    ("finetune.conv_layers=-1", "finetune.conv_layers must be >= 0"),
    ("finetune.conv_layers=4", "finetune.conv_layers must be in 0..3 (the stride-16 conv units of backbone.arch 'zf5')"),
    (["backbone.arch=resnet50", "finetune.conv_layers=6"], "finetune.conv_layers must be in 0..5"),
    ("finetune.conv_lr_mult=-1", "finetune.conv_lr_mult must be >= 0"),
    ("finetune.images_per_batch=0", "finetune.images_per_batch must be >= 1"),
    (["finetune.conv_layers=2", "finetune.batch_size=4", "finetune.images_per_batch=8"],
     "finetune.images_per_batch must be <= batch_size (4) when conv_layers > 0"),
    # svm
    ("svm.C=-1", "svm.C must be > 0, got -1.0"),
    ("svm.pos_weight=0", "svm.pos_weight must be > 0"),
    ("svm.bias=0", "svm.bias must be > 0"),
    ("svm.neg_iou=0", "svm.neg_iou must be in (0, 1]"),
    ("svm.hard_thresh=.nan", "svm.hard_thresh must be a finite number"),
    ("svm.hard_thresh=-.inf", "svm.hard_thresh must be a finite number"),
    ("svm.evict_thresh=-1", "svm.evict_thresh must be < hard_thresh (-1.0001), got -1.0"),
    ("svm.evict_thresh=.inf", "svm.evict_thresh must be a finite number or -inf, got inf"),
    ("svm.retrain_every=0", "svm.retrain_every must be >= 1"),
    ("svm.feature_norm=0", "svm.feature_norm must be > 0"),
    ("svm.stats_images=0", "svm.stats_images must be >= 1"),
    ("svm.stats_rois=0", "svm.stats_rois must be >= 1"),
    ("svm.max_images=-1", "svm.max_images must be >= 0"),
    ("svm.max_hard_per_image=-1", "svm.max_hard_per_image must be >= 0"),
    ("svm.tol=0", "svm.tol must be > 0"),
    ("svm.max_cache=-1", "svm.max_cache must be >= 0"),
    # bbox_reg
    ("bbox_reg.lam=0", "bbox_reg.lam must be > 0"),
    ("bbox_reg.min_iou=1", "bbox_reg.min_iou must be in [0, 1)"),
    ("bbox_reg.whiten_eps=0", "bbox_reg.whiten_eps must be > 0"),
    ("bbox_reg.max_per_class=-1", "bbox_reg.max_per_class must be >= 0"),
    ("bbox_reg.jitter_per_gt=-2", "bbox_reg.jitter_per_gt must be >= 0"),
    ("bbox_reg.jitter_sigma=0", "bbox_reg.jitter_sigma must be > 0"),
    # test
    ("test.nms=-1", "test.nms must be in [0, 1], got -1.0"),
    ("test.nms=2", "test.nms must be in [0, 1], got 2.0"),
    ("test.max_per_class=-1", "test.max_per_class must be >= 0"),
    ("test.score_thresh=.nan", "test.score_thresh must be a finite number or -inf, got nan"),
    ("test.score_thresh=.inf", "test.score_thresh must be a finite number or -inf, got inf"),
    ("test.svd_rank=-1", "test.svd_rank must be >= 0"),
    ("test.target_side=-3", "test.target_side must be >= 0 (0 = features.target_side), got -3.0"),
    ("test.target_side=.nan", "test.target_side must be a finite number"),
    # top level
    ("output_dir=", "output_dir must be non-empty"),
    ("seed=-1", "seed must be in [0, 4294967295]"),
    (f"seed={2**32}", "seed must be in [0, 4294967295]"),
    ("device=gpu", "device must be 'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA when available, else CPU), got 'gpu'"),
    ("device=cuda:x", "device must be 'cpu', 'cuda', 'cuda:N' or 'auto'"),
    ("num_threads=-1", "num_threads must be >= 0"),
]


@pytest.mark.parametrize("overrides, line", BAD_VALUES, ids=[str(o) for o, _ in BAD_VALUES])
def test_out_of_range_values_are_refused_at_load(overrides, line: str):
    overrides = [overrides] if isinstance(overrides, str) else overrides
    with pytest.raises(ConfigError, match="^overrides: " + re.escape(line)):
        load_config(None, overrides)


def test_every_field_has_a_rule_and_a_case_above():
    """Each field is a choice (Literal, tested above), a bool, a free string (listed here: paths,
    names, "" = unused), or has a rule (Annotated, or a float's finiteness) with a case in BAD_VALUES."""
    import typing

    free = {"name", "data.val_split", "proposals.train_file", "proposals.test_file", "proposals.edge_model",
            "features.cache_dir"}
    ruled, other = set(), set()

    def walk(section, where):
        hints = typing.get_type_hints(type(section), include_extras=True)
        for f in dataclasses.fields(section):
            tp, key = hints[f.name], where + f.name
            if dataclasses.is_dataclass(tp):
                walk(getattr(section, f.name), key + ".")
            elif tp is float or typing.get_origin(tp) is typing.Annotated:
                ruled.add(key)
            elif tp is not bool and typing.get_origin(tp) is not typing.Literal:
                other.add(key)

    walk(Config(), "")
    assert other == free
    tested = {re.sub(r"\[\d+\]", "", line.split(" must be ")[0]) for _, line in BAD_VALUES}
    assert ruled - tested == set()


def test_several_bad_keys_are_reported_together(tmp_path: Path):
    p = tmp_path / "x.yaml"
    p.write_text("finetune: {iters: -5, lr: -1}\ntest: {nms: 2, score: svm}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p, ["data.max_train_images=-2", "proposals.max_boxes=-1", "features.test_scales=[0]"])
    msg = str(e.value)
    assert msg.startswith(f"{p} + overrides: 6 problems:")
    for key in ("finetune.iters", "finetune.lr", "test.nms", "data.max_train_images", "proposals.max_boxes",
                "features.test_scales[0]"):
        assert re.search(rf"^  {re.escape(key)} must be ", msg, re.M), key
    # unknown keys and wrong types are also collected (before any range check)
    with pytest.raises(ConfigError) as e:
        load_config(None, ["finetune.iterz=5", "svm.C=abc", "test.score=best", "finetune.iters=-5"])
    msg = str(e.value)
    assert msg.startswith("3 problems:") and "finetune.iterz" in msg and "svm.C" in msg and "test.score" in msg


def test_boundary_values_that_mean_something_load():
    ok = ["test.score_thresh=-.inf", "svm.evict_thresh=-.inf", "test.nms=0", "test.nms=1", "finetune.val_every=0",
          "data.val_fraction=0", "features.max_size=1200", "test.svd_rank=0", "test.max_per_class=0",
          "finetune.lr_steps=[]", "finetune.lr_steps=[0]", "finetune.fg_fraction=1", "finetune.bg_iou_low=0",
          "finetune.fg_iou=1", "device=cuda", "device=cuda:1", "device=auto", "seed=4294967295",
          "finetune.images_per_batch=500",  # unused with conv_layers = 0
          "pretrain.sizes=[31]", "features.train_scales=[31, 64]"]
    for item in ok:
        load_config(None, [item])
    for combo in (["backbone.arch=resnet50", "finetune.conv_layers=5", "features.test_scales=[1]"],
                  ["backbone.arch=vgg16", "finetune.conv_layers=3", "backbone.weights=imagenet"],
                  ["proposals.method=file", "proposals.test_file=boxes.mat"],  # test_net.py alone needs no train_file
                  ["proposals.method=edge_boxes", "proposals.edge_model=model.yml.gz"],
                  ["finetune.conv_layers=5", "backbone.arch=resnet50"]):  # checked once all overrides are in
        load_config(None, combo)


def test_config_from_dict_and_check_config_apply_the_rules():
    with pytest.raises(ConfigError, match="^finetune.iters must be >= 1, got 0$"):
        config_from_dict({"finetune": {"iters": 0}})
    check_config(Config())
    bad = dataclasses.replace(Config(), test=dataclasses.replace(Config().test, nms=float("nan")))
    with pytest.raises(ConfigError, match="^test.nms must be a finite number, got nan$"):
        check_config(bad)


def test_trunk_tables_match_the_backbones():
    """TAIL_UNITS and MIN_INPUT_SIDE repeat facts of detector/backbones.py (config.py loads without torch)."""
    import typing

    from detector import backbones
    from detector.config import BackboneConfig

    archs = typing.get_args(typing.get_type_hints(BackboneConfig)["arch"])
    assert set(TAIL_UNITS) == set(MIN_INPUT_SIDE) == set(archs)
    assert WIDTH_ARCHS == backbones.WIDTH_ARCHS
    for arch in archs:
        assert TAIL_UNITS[arch] == backbones._arch_class(arch).tail_units, arch
        side = MIN_INPUT_SIDE[arch]
        assert backbones.conv5_size(arch, side) >= 1, arch
        assert side == 1 or backbones.conv5_size(arch, side - 1) == 0, arch


def test_shipped_configs_load():
    paths = sorted(PACKAGED_CONFIGS.glob("*.yaml"))
    assert len(paths) >= 4
    for p in paths:
        load_config(p)


def test_root_configs_is_the_packaged_folder():
    """``configs/`` at the repository root (README and Makefile paths) shows the packaged files."""
    assert PACKAGED_CONFIGS == REPO / "detector" / "configs"
    assert (REPO / "configs").resolve() == PACKAGED_CONFIGS
    assert sorted(p.name for p in (REPO / "configs").glob("*.yaml")) == [f"{n}.yaml" for n in packaged_configs()]


def test_bare_name_finds_the_packaged_config(tmp_path: Path, monkeypatch):
    """``--config digits_zf5`` works from any folder: a bare name is a packaged config; a path
    works as before, and a file of that name in the working folder comes first."""
    monkeypatch.chdir(tmp_path)
    packaged = PACKAGED_CONFIGS / "digits_zf5.yaml"
    assert resolve_config_path("digits_zf5") == packaged
    assert resolve_config_path("digits_zf5.yaml") == packaged
    assert resolve_config_path(packaged) == packaged
    assert load_config("digits_zf5") == load_config(packaged)
    (tmp_path / "digits_zf5.yaml").write_text("output_dir: mine\n")
    assert resolve_config_path("digits_zf5.yaml") == Path("digits_zf5.yaml")
    assert load_config("digits_zf5.yaml").output_dir == "mine"
    with pytest.raises(ConfigError, match=r"config file not found: nope \(.*digits_zf5"):
        load_config("nope")
    with pytest.raises(ConfigError, match="config file not found: sub/digits_zf5"):
        load_config("sub/digits_zf5")  # a path is only ever a path


def _config_texts_in_tests():
    """Module-level YAML config texts that the test files write (e.g. conftest.TINY), with
    their ``str.format`` fields filled in."""
    for path in sorted(Path(__file__).parent.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
                    and isinstance(node.value.value, str) and "output_dir:" in node.value.value):
                text = node.value.value
                fields = {f for _, f, _, _ in string.Formatter().parse(text) if f}
                yield f"{path.name}:{node.targets[0].id}", text.format(**{f: f"/tmp/{f}" for f in fields})


def test_tiny_configs_of_the_tests_load(tmp_path: Path):
    found = dict(_config_texts_in_tests())
    assert "conftest.py:TINY" in found
    for name, text in found.items():
        p = tmp_path / "tiny.yaml"
        p.write_text(text)
        load_config(p)
        # and with the overrides those tests pass to the tools
        load_config(p, ["output_dir=/tmp/x", "finetune.iters=7", "svm.C=0.5", "finetune.conv_layers=2",
                        "finetune.images_per_batch=2"])


def test_scientific_notation_reads_as_a_number(tmp_path):
    """YAML 1.1 reads `1e-3` as a string; the config reader takes it as the number it looks like."""
    p = tmp_path / "c.yaml"
    p.write_text("finetune:\n  lr: 1e-3\n  weight_decay: 5E-4\nsvm:\n  C: 1.5e+2\n")
    cfg = load_config(p, ["pretrain.lr=2e-3"])
    assert (cfg.finetune.lr, cfg.finetune.weight_decay, cfg.svm.C, cfg.pretrain.lr) == (1e-3, 5e-4, 150.0, 2e-3)


def _custom_yaml(imagenet: bool) -> str:
    """configs/custom.yaml as shipped, or with its from-scratch block replaced by the commented
    ImageNet block, as its comments tell a user to do."""
    out, block = [], None
    for line in (REPO / "configs" / "custom.yaml").read_text().splitlines():
        m = re.match(r"# (>>>|<<<) (from scratch|imagenet)", line)
        if m:
            block = m.group(2) if m.group(1) == ">>>" else None
            continue
        if imagenet and block == "from scratch":
            continue
        if imagenet and block == "imagenet" and re.match(r"# *\w+:( |$)", line):  # a commented YAML key
            line = line[2:]
        out.append(line)
    return "\n".join(out) + "\n"


def test_custom_config_is_neutral_and_its_imagenet_block_loads(tmp_path: Path):
    """configs/custom.yaml: the spec's test settings, windows aimed at the pre-training crop size; the
    commented ImageNet block, swapped in for the from-scratch one, is a valid config too."""
    scratch = load_config(REPO / "configs" / "custom.yaml")
    assert (scratch.test.nms, scratch.test.score) == (0.3, "svm") and scratch.data.format == "voc"
    assert scratch.pretrain.enabled and scratch.backbone.weights == "none"
    assert scratch.features.target_side == max(scratch.pretrain.sizes)
    assert scratch.head.fc_dim == scratch.pretrain.fc_dim
    p = tmp_path / "custom_imagenet.yaml"
    p.write_text(_custom_yaml(imagenet=True))
    net = load_config(p)
    assert (net.backbone.arch, net.backbone.weights, net.pretrain.enabled) == ("resnet50", "imagenet", False)
    assert net.features.target_side == 208 and net.finetune == scratch.finetune and net.test == scratch.test
    assert load_config(p, ["backbone.arch=vgg16", "data.format=coco"]).backbone.arch == "vgg16"


def test_fields_added_at_their_default_leave_stage_keys_unchanged():
    """A field flagged with config.added() is left out of digests while at its default, so runs made
    before it existed keep their keys; set to anything else it counts. Reports keep every field."""
    from detector.artifacts import KEYLESS_AT_DEFAULT, digest, jsonable
    from detector.config import BBoxRegConfig, PretrainConfig, added

    assert added(0).metadata == {KEYLESS_AT_DEFAULT: True}
    before = {k: v for k, v in jsonable(PretrainConfig()).items() if k != "bn_images"}  # the section as it was
    assert digest(PretrainConfig()) == digest(before)
    assert digest(PretrainConfig(bn_images=5)) != digest(before)
    before = {k: v for k, v in jsonable(BBoxRegConfig()).items() if k not in ("jitter_per_gt", "jitter_sigma")}
    assert digest(BBoxRegConfig()) == digest(before)
    assert digest(BBoxRegConfig(jitter_per_gt=4)) != digest(before)
    assert digest([Config()]) == digest([Config()]) and "bn_images" in jsonable(Config())["pretrain"]
