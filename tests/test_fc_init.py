"""fc6/fc7 start from the trunk's weights file when it holds them (paper §4), in each key style."""
from __future__ import annotations

import logging

import torch

from detector.engine.train import init_fc_from_weights, weights_fc_layers
from detector.head import FCHead


def _head() -> FCHead:
    torch.manual_seed(0)
    return FCHead(20, fc_dim=8, num_classes=2, dropout=0.5)


def _fc(in_dim: int = 20, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc6.weight": torch.randn(8, in_dim, generator=g), "fc6.bias": torch.randn(8, generator=g),
            "fc7.weight": torch.randn(8, 8, generator=g), "fc7.bias": torch.randn(8, generator=g),
            "cls_score.weight": torch.randn(3, 8, generator=g), "cls_score.bias": torch.randn(3, generator=g)}


def test_flat_state_dict_with_fc_keys(tmp_path, caplog):
    fc = _fc()
    path = tmp_path / "zf5_paper.pt"
    torch.save({"conv1.weight": torch.zeros(1), **{k: v for k, v in fc.items() if not k.startswith("cls")}}, path)
    head, before = _head(), _head().state_dict()
    with caplog.at_level(logging.INFO):
        copied = init_fc_from_weights(head, str(path), ("a", "b"))
    assert sorted(copied) == ["fc6.bias", "fc6.weight", "fc7.bias", "fc7.weight"]
    sd = head.state_dict()
    for k in copied:
        assert torch.equal(sd[k], fc[k])
    assert torch.equal(sd["cls_score.weight"], before["cls_score.weight"])  # not in the file: spec init
    assert "fc6, fc7 from" in caplog.text and "cls_score random" in caplog.text


def test_classifier_checkpoint_brings_its_classifier_for_the_same_classes(tmp_path):
    fc = _fc()
    path = tmp_path / "classifier.pt"
    torch.save({"backbone": {"conv1.weight": torch.zeros(1)}, "fc": fc, "class_names": ["a", "b"]}, path)
    head = _head()
    assert len(init_fc_from_weights(head, str(path), ("a", "b"))) == 6
    assert torch.equal(head.state_dict()["cls_score.weight"], fc["cls_score.weight"])
    other = _head()
    assert "cls_score.weight" not in init_fc_from_weights(other, str(path), ("a", "c"))  # other classes


def test_torchvision_vgg_names_and_shape_mismatch(tmp_path, caplog):
    fc = _fc(in_dim=30)  # fc6 of a fixed-grid net: another input width than the SPP head's 20
    path = tmp_path / "vgg.pt"
    torch.save({"features.0.weight": torch.zeros(1), "classifier.0.weight": fc["fc6.weight"],
                "classifier.0.bias": fc["fc6.bias"], "classifier.3.weight": fc["fc7.weight"],
                "classifier.3.bias": fc["fc7.bias"]}, path)
    assert sorted(weights_fc_layers(str(path))) == ["fc6.bias", "fc6.weight", "fc7.bias", "fc7.weight"]
    head = _head()
    with caplog.at_level(logging.INFO):
        copied = init_fc_from_weights(head, str(path), ("a", "b"))
    assert sorted(copied) == ["fc7.bias", "fc7.weight"]  # fc6 stays random as a whole
    assert "fc6.weight (8, 30) vs (8, 20)" in caplog.text


def test_no_fc_layers(tmp_path):
    path = tmp_path / "conv_only.pt"
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    assert weights_fc_layers(str(path)) == {} and weights_fc_layers("none") == {}
