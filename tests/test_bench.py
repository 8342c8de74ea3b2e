"""detector.bench: the SPP-net vs R-CNN timing comparison (its table and derived times), random boxes,
the spp section, BENCHMARKS.md blocks, and the error style of tools/benchmark.py and tools/compare_rcnn.py.

Shape shorthand: R windows.
"""
from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch

from detector.bench.random_model import random_boxes, random_detector
from detector.bench.rcnn_compare import compare_rcnn, format_comparison
from detector.bench.runner import update_section
from detector.bench.spp import section_spp

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.fixture(scope="module")
def tiny_det():
    return random_detector(width_mult=0.0625, fc_dim=32, num_classes=3, scales=(160,), seed=0)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(90, 120, 3), dtype=np.uint8)


def test_compare_rcnn_table(tiny_det, image):
    boxes = torch.tensor([[10.0, 10.0, 60.0, 50.0], [0.0, 0.0, 120.0, 90.0]])
    cmp = compare_rcnn(tiny_det, [image, image], [boxes, boxes], scale_sets=((96,), (64, 96)), warmup=False)
    assert list(cmp["spp"]) == ["1-sc (96)", "2-sc"]
    r = cmp["rcnn"]
    assert r["conv_time"]["values"] == pytest.approx([a + b for a, b in zip(r["crop"]["values"], r["conv"]["values"])])
    for lab in cmp["spp"]:
        s = cmp["spp"][lab]
        assert cmp["speedup"][lab]["conv"] == pytest.approx(r["conv_time"]["median"] / s["conv_time"]["median"])
        for j in range(2):
            assert s["total"]["values"][j] == pytest.approx(s["conv"]["values"][j] + s["pool"]["values"][j]
                                                           + s["fc"]["values"][j])
    table = format_comparison(cmp)
    assert "speedup, conv only" in table and "R-CNN" in table and table.count("\n|") >= 7
    assert cmp["svd"] == {}


def test_compare_rcnn_svd_rows_reuse_the_conv_times(tiny_det, image):
    """With svd_ranks, the compressed fc is timed on the same pooled features; its totals are the same
    conv (+ crop) and pool times plus the compressed fc time."""
    boxes = torch.tensor([[10.0, 10.0, 60.0, 50.0], [0.0, 0.0, 120.0, 90.0]])
    cmp = compare_rcnn(tiny_det, [image, image], [boxes, boxes], scale_sets=((96,),), warmup=False, svd_ranks=(4,))
    sv = cmp["svd"][4]
    lab = "1-sc (96)"
    s, r = cmp["spp"][lab], cmp["rcnn"]
    for j in range(2):
        assert sv["spp"][lab]["total"]["values"][j] == pytest.approx(
            s["conv"]["values"][j] + s["pool"]["values"][j] + sv["spp"][lab]["fc"]["values"][j])
        assert sv["rcnn"]["total"]["values"][j] == pytest.approx(
            r["crop"]["values"][j] + r["conv"]["values"][j] + r["pool"]["values"][j] + sv["rcnn"]["fc"]["values"][j])
    assert sv["speedup"][lab]["overall"] == pytest.approx(sv["rcnn"]["total"]["median"] / sv["spp"][lab]["total"]["median"])
    assert "speedup, overall, SVD rank 4" in format_comparison(cmp)


def test_random_boxes_inside_the_image_and_seeded():
    a = random_boxes(90, 120, 50, torch.Generator().manual_seed(4))
    b = random_boxes(90, 120, 50, torch.Generator().manual_seed(4))
    assert a.shape == (50, 4) and a.dtype == torch.float32 and torch.equal(a, b)
    assert bool((a[:, 0] >= 0).all() and (a[:, 1] >= 0).all() and (a[:, 2] <= 120).all() and (a[:, 3] <= 90).all())
    assert bool(((a[:, 2] - a[:, 0]) >= 20).all() and ((a[:, 3] - a[:, 1]) >= 20).all())
    assert torch.equal(a, a.round())


def test_section_spp_small_map():
    md, ratios = section_spp(runs=1, n_windows=20, shape=(4, 9, 11))
    assert ratios["spp_pool_equals_roi_pool"] == 1.0
    assert ratios["spp_pool_vs_roi_pool_speedup"] == ratios["spp_pool_vs_roi_pool_speedup_1thread"] > 0
    assert "Outputs identical: yes" in md and "| 1 | `spp_pool` (sparse table, one call) |" in md


def test_update_section_replaces_its_block_only(tmp_path):
    path = tmp_path / "B.md"
    update_section(path, "a", "## a\n\nfirst")  # a missing file gets a header
    text = path.read_text()
    assert text.startswith("# Benchmarks\n") and "<!-- benchmark:a -->\n## a\n\nfirst\n<!-- /benchmark:a -->" in text
    path.write_text(path.read_text() + "\nhand-written note\n")
    update_section(path, "b", "## b\n\nother")
    update_section(path, "a", "## a\n\nsecond")
    text = path.read_text()
    assert "first" not in text and "second" in text and "other" in text and "hand-written note" in text
    assert text.index("benchmark:a") < text.index("hand-written note") < text.index("benchmark:b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["B.md"]  # written atomically, no temp left


def test_benchmark_tool_bad_voc_root_is_one_error_line(tmp_path, capsys):
    main = runpy.run_path(str(TOOLS / "benchmark.py"))["main"]
    assert main(["--only", "memory", "--voc-root", str(tmp_path / "nope"), "--no-write"]) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(errors) == 1 and errors[0].startswith("error: split file not found") and "Traceback" not in err
    assert str(tmp_path / "nope") in errors[0]


def test_run_rcnn_comparison_writes_what_it_prints(tmp_path):
    from detector.bench.rcnn_compare import run_rcnn_comparison

    rep = run_rcnn_comparison(width_mult=0.0625, fc_dim=32, num_images=1, n_proposals=8, ss_mode="fast",
                              threads=0, scale_sets=((64,), (64, 96)), out=tmp_path / "cmp.json", command="cmd")
    lines = rep.text().splitlines()
    assert lines[0] == "model: random ZF-5 width 0.0625, fc 32"
    assert lines[-4:-2] == [f"rcnn_conv_speedup_1_sc: {rep.data['speedup']['1-sc (64)']['conv']:.2f}",
                            f"rcnn_overall_speedup_1_sc: {rep.data['speedup']['1-sc (64)']['overall']:.2f}"]
    saved = json.loads((tmp_path / "cmp.json").read_text())
    assert saved["command"] == "cmd" and saved["proposals"] == [8] and saved["model"] == rep.model
    assert saved["selective_search_boxes"][0] <= 8 and len(saved["image_names"]) == 1


def test_compare_rcnn_tool_user_errors(tmp_path, capsys):
    main = runpy.run_path(str(TOOLS / "compare_rcnn.py"))["main"]
    assert main(["--checkpoint", str(tmp_path / "none.pt")]) == 2
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if "error:" in ln]
    assert errors == [f"error: checkpoint not found: {tmp_path / 'none.pt'}"] and "Traceback" not in err
    with pytest.raises(SystemExit) as e:  # a bad argument is argparse's error
        main(["--random-zf5", "-n", "0"])
    assert e.value.code == 2 and "-n must be >= 1" in capsys.readouterr().err


def test_section_batch_small():
    """The batch section on a tiny model: both calls timed, the same detections, figures named."""
    from detector.bench.sections import section_batch

    md, ratios = section_batch(n_images=2, runs=1, threads=1, batch_size=2, workers=0, width_mult=0.125, fc_dim=16,
                               size=(96, 128))
    assert ratios["batch_equals_loop"] == 1.0 and ratios["loop_images_per_s"] > 0
    assert "Same detections in every run: yes" in md and "| loop: `[det.detect(im) for im in images]` |" in md


def _fake_run(root: Path, world: int, seconds: dict[str, float], test_seconds: dict[str, float]) -> Path:
    """A finished run folder as train and test leave it: 10 training images (20 cache entries with
    their flips), 100 fine-tuning iterations, 4 test images."""
    root.mkdir(parents=True)
    (root / "train_timings.json").write_text(json.dumps({**seconds, "total": sum(seconds.values())}))
    rank = {"peak_rss_mib_per_stage": {s: 100.0 * (i + 1) for i, s in enumerate(seconds)}}
    mem = rank if world == 1 else {"ranks": [rank] + [{"peak_rss_mib_per_stage": {"cache": 900.0}}] * (world - 1)}
    (root / "train_memory.json").write_text(json.dumps(mem))
    (root / "resolved_config.yaml").write_text(
        "data: {train_split: trainval, test_split: test}\nfinetune: {iters: 100}\n")
    (root / "proposals").mkdir()
    np.savez(root / "proposals" / "trainval-abc.npz", ids=np.array([f"{i:06d}" for i in range(10)]))
    np.savez(root / "proposals" / "test-abc.npz", ids=np.array(["x"] * 4))
    (root / "conv5_cache").mkdir()
    for i in range(20):
        (root / "conv5_cache" / f"{i:06d}.pt").write_bytes(b"")
    (root / "test_test").mkdir()
    (root / "test_test" / "test_timings.json").write_text(json.dumps(
        {"stage_seconds": test_seconds, "peak_rss_mib_per_stage": {"detect": 300.0}, "world_size": world}))
    (root / "test_test" / "eval.json").write_text(json.dumps({"images": 4}))
    return root


def test_scale_section_reads_runs_and_projects_to_voc(tmp_path):
    from detector.bench.scale import VOC07, ScaleError, section_scale

    one = _fake_run(tmp_path / "one", 1, {"proposals": 50.0, "pretrain": 7.0, "cache": 40.0, "finetune": 200.0,
                                          "stats": 5.0, "svm": 30.0, "bbox": 10.0}, {"proposals": 8.0, "detect": 12.0})
    two = _fake_run(tmp_path / "two", 2, {"proposals": 25.0, "pretrain": 4.0, "cache": 21.0, "finetune": 110.0,
                                          "stats": 3.0, "svm": 16.0, "bbox": 5.0}, {"proposals": 4.0, "detect": 6.0})
    md, ratios = section_scale([two, one], processes=(1, 8))  # sorted by processes: `one` is the base
    # per-unit costs of the 1-process run, by hand
    assert ratios["train_proposals_s_per_train_images"] == 5.0          # 50 s / 10 images
    assert ratios["train_cache_s_per_cache_entries"] == 2.0             # 40 s / 20 entries
    assert ratios["train_finetune_s_per_iterations"] == 2.0             # 200 s / 100 iterations
    assert ratios["test_detect_s_per_test_images"] == 3.0               # 12 s / 4 images
    hand = (5.0 * 5011 + 2.0 * 10022 + 2.0 * 200000 + (0.5 + 3.0 + 1.0) * 5011 + (2.0 + 3.0) * 4952) / 3600
    assert VOC07 == {"train images": 5011, "cache entries": 10022, "iterations": 200000, "test images": 4952}
    assert abs(ratios["voc07_projected_hours_1proc"] - hand) < 1e-9
    assert abs(ratios["voc07_projected_hours_8proc"] - hand / 8) < 1e-9
    assert ratios["train_total_s_1proc"] == 342.0 and ratios["train_total_s_2proc"] == 184.0
    assert "| finetune | 200.0 | 400 | 110.0 | 400 | 1.82x |" in md      # seconds, peak MiB, speed-up 200/110
    assert "| cache | 40.0 | 300 | 21.0 | 900 | 1.90x |" in md          # the largest peak over the ranks
    assert "5 x 5011 / 8 = 52.2 min" in md                             # 25055 s / 8 = 3131.9 s
    (one / "train_memory.json").unlink()
    with pytest.raises(ScaleError, match="train_memory.json"):
        section_scale([one])
    main = runpy.run_path(str(TOOLS / "benchmark.py"))["main"]
    assert main(["--only", "scale", "--no-write"]) == 2                # no run folders: one error line
    assert main(["--only", "scale", "--no-write", "--scale-runs", str(one)]) == 2


def test_scale_section_of_one_run_has_no_speed_up_column(tmp_path):
    from detector.bench.scale import section_scale

    one = _fake_run(tmp_path / "one", 1, {"proposals": 50.0, "finetune": 200.0}, {"detect": 12.0})
    md, _ = section_scale([one], processes=(1,))
    assert "| finetune | 200.0 | 200 |\n" in md and "speed-up" not in md


def test_growth_section_gives_each_stage_peak_and_its_growth_per_1000_images(tmp_path):
    from detector.bench.growth import section_growth
    from detector.bench.scale import ScaleError

    runs = []
    for n, svm_peak in ((10, 500.0), (30, 500.0), (110, 900.0)):
        r = _fake_run(tmp_path / f"d{n}", 1, {"proposals": 5.0, "svm": 3.0}, {"detect": 1.0})
        np.savez(r / "proposals" / "trainval-abc.npz", ids=np.array([f"{i:06d}" for i in range(n)]))
        (r / "train_memory.json").write_text(json.dumps({"peak_rss_mib_per_stage": {"proposals": 100.0,
                                                                                    "svm": svm_peak}}))
        runs.append(r)
    md, ratios = section_growth([str(runs[2]), str(runs[0]), str(runs[1])])  # any order: sorted by size
    assert ratios["growth_proposals_mib_per_1000_images"] == 0.0
    assert ratios["growth_svm_mib_per_1000_images"] == 4000.0  # (900 - 500) MiB / (110 - 10) images x 1000
    assert "| svm | 500 | 500 | 900 | +4000 MiB | 3 |" in md
    with pytest.raises(ScaleError, match="two or more"):
        section_growth([str(runs[0])])
    with pytest.raises(ScaleError, match="all have 10 training images"):
        section_growth([str(runs[0]), str(runs[0])])


def test_peers_images_of_a_voc_split(tmp_path, capsys):
    """The peers section reads the first N images of a VOC-layout test split, and the tool refuses a
    root without one before any work (exit 2, the path named)."""
    from PIL import Image

    from detector.bench.peers import peer_images

    (tmp_path / "ImageSets" / "Main").mkdir(parents=True)
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "ImageSets" / "Main" / "test.txt").write_text("a\nb\nc\n")
    for i, name in enumerate("abc"):
        Image.fromarray(np.full((40 + i, 50, 3), 10 * i, np.uint8)).save(tmp_path / "JPEGImages" / f"{name}.png")
    images, what = peer_images(str(tmp_path), n_images=2)
    assert [im.shape for im in images] == [(40, 50, 3), (41, 50, 3)] and "first 2 images" in what.lower()
    assert len(peer_images(str(tmp_path), n_images=0)[0]) == 3
    with pytest.raises(FileNotFoundError, match="val.txt"):
        peer_images(str(tmp_path), split="val")
    main = runpy.run_path(str(TOOLS / "benchmark.py"))["main"]
    with pytest.raises(SystemExit) as e:
        main(["--only", "peers", "--peers-voc", str(tmp_path / "JPEGImages"), "--no-write"])
    assert e.value.code == 2 and "no ImageSets/Main/test.txt" in capsys.readouterr().err


@pytest.mark.parametrize("env,block,prefix", [("1", "detect", ""), ("0", "detect_no_thp", "THP_MEM_ALLOC_ENABLE=0 ")])
def test_run_benchmarks_names_the_block_by_huge_pages(tmp_path, monkeypatch, env, block, prefix):
    from detector.bench import runner

    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", env)
    monkeypatch.setattr(runner, "run_section", lambda name, **kw: ("| a | b |", {"x_s": 0.5}))
    out = tmp_path / "B.md"
    lines = list(runner.run_benchmarks(["detect"], out=out, write=True, argv=("python", "tools/benchmark.py")))
    assert lines == ["x_s: 0.5"]
    text = out.read_text()
    assert f"<!-- benchmark:{block} -->" in text and f"## {block}\n" in text
    assert f"Command: `{prefix}python tools/benchmark.py`" in text


def test_calibrated_svms_pass_the_asked_share_and_leave_the_model_alone():
    """The detect section's trained-like scoring: the SVM copy's biases are shifted so that the
    asked share of each class's windows scores above the threshold; the model's own SVMs are unchanged."""
    import torch

    from detector.bench.random_model import random_detector
    from detector.bench.sections import _calibrated_svms

    det = random_detector(width_mult=0.25, fc_dim=32, num_classes=4, seed=0)
    pooled = torch.rand(500, det.head.in_dim, generator=torch.Generator().manual_seed(0))
    before = det.svms.bias.clone()
    with torch.no_grad():
        svms = _calibrated_svms(det, pooled, 0.10)
        assert torch.equal(det.svms.bias, before)
        passed = (svms(det.fc_features(pooled)) > det.params.score_thresh).float().mean(dim=0)  # (K,)
        assert passed.tolist() == pytest.approx([0.10] * 4, abs=0.004)
        # the random model's own scores all pass: the worst case the section also times
        assert bool((det.svm_scores(det.fc_features(pooled)) > det.params.score_thresh).all())
