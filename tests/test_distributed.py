"""torch.distributed (detector.distributed, the engine's stages under torchrun): on the CPU with
gloo on the loopback address only. Two processes give the one-process results: bit-identical
where the arithmetic is the same (every per-image stage, the class-split SVMs, detections), within
float tolerance where only a reduction order differs (one DDP step against one step on the whole
batch). No two ranks write one file; a failing rank names itself and its stage; a rerun resumes."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import checkpoint_tensors

from detector.distributed import DistInfo, all_gather, barrier, broadcast, current, shard

REPO = Path(__file__).resolve().parents[1]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], nproc: int = 2, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node N`` on 127.0.0.1 (static rendezvous, no other address)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
           "--master-addr=127.0.0.1", f"--master-port={_port()}", *args]
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=e)


def test_single_process_helpers_are_no_ops():
    assert current() == DistInfo(0, 1, 0) and current().main and not current().active
    assert shard(list(range(10)), DistInfo(1, 3)) == [1, 4, 7]
    assert shard(list(range(10))) == list(range(10))
    assert all_gather({"a": 1}) == [{"a": 1}] and broadcast(5) == 5
    barrier()


FIXED_BATCH = """g = torch.Generator().manual_seed(1)
x, y = torch.randn(16, 24, generator=g), torch.randint(0, 4, (16,), generator=g)

class Source:  # one fixed batch of 16 windows; each rank takes its contiguous share
    def trainable(self): return []
    def batches(self, start, iters):
        lo, hi = 16 * info.rank // info.world, 16 * (info.rank + 1) // info.world
        for _ in range(start, iters):
            yield x[lo:hi], y[lo:hi], 16, torch.arange(lo, hi)
    def validation(self): return None
    def state_dict(self): return {}
    def load_state_dict(self, s): pass
"""  # a window source of one fixed batch, for the torchrun scripts below


STEP = """
import sys, torch, torch.distributed as dist
from detector.config import FinetuneConfig
from detector.finetune import finetune
from detector.head import FCHead
from detector import distributed
info, _ = distributed.init("cpu")
torch.manual_seed(0)
""" + FIXED_BATCH + """
head = FCHead(24, fc_dim=32, num_classes=3, dropout=0.5)
params = FinetuneConfig(iters=1, lr=0.1, lr_steps=(), val_every=0, batch_size=16)
grads = {}
hooks = [p.register_hook(lambda gr, n=n: grads.__setitem__(n, gr)) for n, p in head.named_parameters()]
head, _ = finetune(head, Source(), params, progress=False)
if info.main:
    torch.save({"weights": head.state_dict()}, sys.argv[1])
distributed.finish()
"""


def test_one_ddp_step_of_two_ranks_equals_one_step_on_the_whole_batch(tmp_path):
    """Fine-tuning: 2 ranks x 8 windows against 1 rank x 16, the same windows, dropout 0.5: the
    updated weights agree within 1e-6 (each rank keeps its rows of the one-process dropout masks;
    the gradients are summed over ranks in another order)."""
    script = tmp_path / "step.py"
    script.write_text(STEP)
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun([str(script), str(tmp_path / "two.pt")])
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(tmp_path / "one.pt", weights_only=True)["weights"]
    b = torch.load(tmp_path / "two.pt", weights_only=True)["weights"]
    start = FCHead_init()
    for k in a:
        assert not torch.equal(a[k], start[k]) or k.endswith("bias"), k  # the step moved the weights
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


def FCHead_init() -> dict:
    from detector.head import FCHead

    torch.manual_seed(0)
    return FCHead(24, fc_dim=32, num_classes=3, dropout=0.0).state_dict()


CLASSIFIER_STEP = """
import sys, torch
from detector import distributed
from detector.backbones import build_backbone
from detector.classifier import SPPClassifier
from detector.data.crops import CropSet
from detector.pretrain import train_classifier
info, _ = distributed.init("cpu")
g = torch.Generator().manual_seed(3)
n = 12
crops = CropSet(images=(torch.rand(n, 48, 48, 3, generator=g) * 255).to(torch.uint8),
                labels=torch.randint(0, 3, (n,), generator=g), class_names=("a", "b"),
                image_ids=[str(i) for i in range(n)])
torch.manual_seed(0)
model = SPPClassifier(build_backbone("zf5", width_mult=0.125), 2, fc_dim=32, levels=(1, 2), dropout=0.5)
train_classifier(model, crops, mode="single", sizes=(48,), epochs=1, batch_size=int(sys.argv[2]), lr=0.01,
                 momentum=0.9, weight_decay=0.0, seed=0, progress=False)
if info.main:
    torch.save({"weights": model.state_dict()}, sys.argv[1])
distributed.finish()
"""


def test_one_ddp_classifier_step_equals_one_step_on_the_whole_batch(tmp_path):
    """Pre-training under DistributedDataParallel: 2 ranks x 6 crops against 1 rank x 12, one step,
    dropout 0.5 (the one-process masks)."""
    script = tmp_path / "cls.py"
    script.write_text(CLASSIFIER_STEP)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt"), "12"], cwd=REPO,
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun([str(script), str(tmp_path / "two.pt"), "6"])
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(tmp_path / "one.pt", weights_only=True)["weights"]
    b = torch.load(tmp_path / "two.pt", weights_only=True)["weights"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


def test_two_processes_give_the_one_process_results(tiny_run, tmp_path):
    """The tiny config under torchrun with 2 processes, starting from the one-process run's
    pre-trained and fine-tuned weights (their keys do not depend on the number of processes):
    proposals, conv5 cache, feature scales, SVMs, box regressors, the model and the test
    detections are bit-identical; no file is written by two processes."""
    root, cfg, _, test = tiny_run
    ref, run = root / "run", tmp_path / "two"
    run.mkdir()
    for sub in ("pretrain", "finetune"):
        shutil.copytree(ref / sub, run / sub)
    trace = tmp_path / "trace"
    (trace / "train").mkdir(parents=True)
    (trace / "test").mkdir()
    env = {"SPPNET_WRITE_TRACE": str(trace / "train")}
    # each rank runs the reference's thread count: the CPU convolution's sums depend on it
    flags = ["--config", str(cfg), "--set", f"output_dir={run}"]
    r = torchrun(["tools/train_detector.py", *flags], env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "stage pretrain: loaded" in (run / "train_log.txt").read_text()
    assert "stage finetune: loaded" in (run / "train_log.txt").read_text()
    t = torchrun(["tools/test_net.py", *flags, "--time-proposals", "0"], env={"SPPNET_WRITE_TRACE": str(trace / "test")})
    assert t.returncode == 0, t.stderr[-4000:]
    assert t.stdout.strip().splitlines()[-1] == test.stdout.strip().splitlines()[-1]  # the mAP line
    for rel in ("model.pt", "svm/svm.pt", "bbox/bbox.pt"):
        a, b = checkpoint_tensors(ref / rel), checkpoint_tensors(run / rel)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{rel}: {k}"
    a, b = (json.loads((r / "fingerprints.json").read_text())["stages"] for r in (ref, run))
    assert a == b  # proposals, cache (entry CRCs), stats, svm, bbox, model: the same identities
    for f in ("test_test/results/comp4_det_test_one.txt", "test_test/results/comp4_det_test_seven.txt"):
        assert (ref / f).read_bytes() == (run / f).read_bytes()
    train_writes = [set(p.read_text().split()) for p in (trace / "train").glob("writes.*.txt")]
    assert len(train_writes) == 2  # both ranks wrote their share of the cache
    assert all(any("/conv5_cache/" in p for p in ws) for ws in train_writes)
    # the 4 test images are one detection shard: one rank writes it and the report
    test_writes = [set(p.read_text().split()) for p in (trace / "test").glob("writes.*.txt")]
    seen: dict[str, int] = {}
    for k, paths in enumerate(train_writes + test_writes):
        for p in paths:
            assert seen.setdefault(p, k) == k, f"{p} written by two processes"


def test_a_failing_rank_names_itself_and_its_stage_and_a_rerun_resumes(tiny_run, tmp_path):
    """A broken image stops the job in the cache stage: the failing rank names itself and the
    stage (and the file). With the image repaired, the rerun resumes from the finished stages and
    the cache entries already written."""
    root, cfg, _, _ = tiny_run
    data = tmp_path / "digits"
    shutil.copytree(root / "digits", data)
    run = tmp_path / "run"
    (tmp_path / "c.yaml").write_text(cfg.read_text().replace(str(root / "digits"), str(data)))
    flags = ["--config", str(tmp_path / "c.yaml"), "--set", f"output_dir={run}", "num_threads=1",
             "pretrain.enabled=false", "--stop-after", "cache"]
    ok = torchrun(["tools/train_detector.py", *flags[:-2], "--stop-after", "proposals"])
    assert ok.returncode == 0, ok.stderr[-3000:]
    last_train_id = (data / "ImageSets" / "Main" / "trainval.txt").read_text().split()[-1]
    victim = data / "JPEGImages" / f"{last_train_id}.jpg"
    good = victim.read_bytes()
    victim.write_bytes(b"not a jpeg")
    bad = torchrun(["tools/train_detector.py", *flags])
    assert bad.returncode != 0
    assert "failed in stage cache" in bad.stderr and victim.name in bad.stderr, bad.stderr[-3000:]
    assert re.search(r"rank [01] of 2 failed in stage cache", bad.stderr)
    built = {p.name for p in (run / "conv5_cache").glob("*.pt")}
    assert built  # the other images' entries were written before the job stopped
    victim.write_bytes(good)
    again = torchrun(["tools/train_detector.py", *flags])
    assert again.returncode == 0, again.stderr[-3000:]
    log = (run / "train_log.txt").read_text().split("rank 0 of 2")[-1]
    assert "stage proposals: loaded" in log and re.search(r"conv5 cache .*: \d+ built, [1-9]\d* reused", log)
    assert built <= {p.name for p in (run / "conv5_cache").glob("*.pt")}


RESUME = """
import sys, copy, torch
from detector import distributed
from detector.config import FinetuneConfig
from detector.finetune import finetune
from detector.head import FCHead
info, _ = distributed.init("cpu")
""" + FIXED_BATCH + """
torch.manual_seed(0)
head = FCHead(24, fc_dim=32, num_classes=3, dropout=0.5)
params = FinetuneConfig(iters=6, lr=0.1, lr_steps=(), val_every=3, batch_size=16)
if sys.argv[1] == "save":
    states = []
    finetune(head, Source(), params, progress=False, save_state=lambda s: states.append(copy.deepcopy(s)))
    if info.main:
        torch.save(states[0], sys.argv[2])
elif sys.argv[1] == "load":
    state = torch.load(sys.argv[2], weights_only=True)
    head, hist = finetune(head, Source(), params, progress=False, resume_state=state)
    torch.save(head.state_dict(), sys.argv[3])
    print("resumed", state["iter"], "with", info.world, "of", len(state["rng"]))
else:
    head, _ = finetune(head, Source(), params, progress=False)
    torch.save(head.state_dict(), sys.argv[3])
distributed.finish()
"""


def test_fine_tuning_saved_by_two_ranks_resumes_with_one(tmp_path):
    """A world-size change between a run and its resume: the resume file of a 2-process run
    continues in 1 process, with the same batches and the same dropout stream, and ends where an
    uninterrupted 1-process run ends (within 1e-6: only the gradient sums' order differs)."""
    script = tmp_path / "resume.py"
    script.write_text(RESUME)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    saved = torchrun([str(script), "save", str(tmp_path / "state.pt")])
    assert saved.returncode == 0, saved.stderr[-3000:]
    one = subprocess.run([sys.executable, str(script), "load", str(tmp_path / "state.pt"), str(tmp_path / "res.pt")],
                         cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "resumed 3 with 1 of 2" in one.stdout
    full = subprocess.run([sys.executable, str(script), "full", "-", str(tmp_path / "full.pt")], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)
    assert full.returncode == 0, full.stderr[-3000:]
    a = torch.load(tmp_path / "full.pt", weights_only=True)
    b = torch.load(tmp_path / "res.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


if not sys.platform.startswith("linux"):
    pytestmark = pytest.mark.skip("gloo on the loopback address is tested on Linux")

