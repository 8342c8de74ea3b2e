"""The stage engine: a stage is loaded when nothing it depends on changed, rebuilt (with everything
downstream) when a setting or an input changes, and a stage killed midway leaves nothing that a
rerun takes for valid."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detector.artifacts import content_id, digest, load_keyed, save_keyed, verify
from detector.config import Config, DataConfig
from detector.engine.run import Output, Run, Stage, StopAfter, peak_memory_mb

REPO = Path(__file__).resolve().parents[1]


class Numbers(Stage[dict]):
    """Upstream toy stage: writes ``value`` (a setting) times a ramp."""

    name = "numbers"

    def __init__(self, folder: Path, value: float, log: list) -> None:
        super().__init__()
        self.folder, self.value, self.log = folder, value, log

    def settings(self) -> object:
        return {"value": self.value}

    @property
    def path(self) -> Path:
        return self.folder / "numbers.pt"

    def load(self) -> dict | None:
        return load_keyed(self.path, self.key)

    def build(self) -> dict:
        self.log.append(self.name)
        out = {"x": torch.arange(4.0) * self.value}
        save_keyed(self.path, self.key, out)
        return out

    def identity(self, value: dict) -> str:
        return digest(self.key, content_id(self.path))


class Sum(Stage[dict]):
    """Downstream toy stage: the sum of its input, keyed by the input's identity."""

    name = "sum"

    def __init__(self, folder: Path, numbers: Output[dict], log: list) -> None:
        super().__init__(numbers)
        self.folder, self.log = folder, log

    @property
    def path(self) -> Path:
        return self.folder / "sum.pt"

    def load(self) -> dict | None:
        return load_keyed(self.path, self.key)

    def build(self) -> dict:
        self.log.append(self.name)
        out = {"s": self.inputs[0].value["x"].sum()}
        save_keyed(self.path, self.key, out)
        return out


def _run(tmp_path: Path, value: float, stop_after: str | None = None) -> tuple[list, dict | None]:
    cfg = Config(output_dir=str(tmp_path / "run"), data=DataConfig(root=str(tmp_path)))
    run = Run(cfg, log_name="log.txt", stop_after=stop_after, argv=["test"])
    built: list = []
    try:
        nums = run.stage(Numbers(run.out, value, built))
        total = run.stage(Sum(run.out, nums, built))
    except StopAfter:
        return built, None
    return built, total.value


def test_unchanged_stages_are_loaded_not_rebuilt(tmp_path):
    built, out = _run(tmp_path, 2.0)
    assert built == ["numbers", "sum"] and float(out["s"]) == 12.0
    built, out = _run(tmp_path, 2.0)
    assert built == [] and float(out["s"]) == 12.0


def test_a_changed_setting_rebuilds_the_stage_and_everything_downstream(tmp_path):
    _run(tmp_path, 2.0)
    built, out = _run(tmp_path, 3.0)
    assert built == ["numbers", "sum"] and float(out["s"]) == 18.0


def test_an_upstream_output_rebuilt_into_other_bytes_rebuilds_downstream(tmp_path):
    _run(tmp_path, 2.0)
    path = tmp_path / "run" / "numbers.pt"
    # the same key, other content: the file is replaced (e.g. rebuilt on another machine)
    key = torch.load(path, weights_only=True)["key"]
    save_keyed(path, key, {"x": torch.arange(4.0) * 5})
    built, out = _run(tmp_path, 2.0)
    assert built == ["sum"] and float(out["s"]) == 30.0
    # rebuilt into the same bytes: nothing downstream is redone
    path.unlink()
    built, _ = _run(tmp_path, 5.0)
    built, out = _run(tmp_path, 5.0)
    assert built == [] and float(out["s"]) == 30.0


def test_a_damaged_output_is_rebuilt_not_used(tmp_path):
    _run(tmp_path, 2.0)
    path = tmp_path / "run" / "sum.pt"
    data = bytearray(path.read_bytes())
    n = len(data)
    data[n // 3: n // 3 + 40] = b"\xff" * 40  # same size, other bytes
    path.write_bytes(bytes(data))
    assert verify(path) is not None
    built, out = _run(tmp_path, 2.0)
    assert built == ["sum"] and float(out["s"]) == 12.0 and verify(path) is None


def test_stop_after_keeps_the_stage_and_stops(tmp_path):
    built, out = _run(tmp_path, 2.0, stop_after="numbers")
    assert built == ["numbers"] and out is None
    built, out = _run(tmp_path, 2.0)
    assert built == ["sum"] and float(out["s"]) == 12.0


KILLED_WRITER = """
import sys, time, torch
sys.path.insert(0, {repo!r})
from detector.artifacts import save_keyed
big = torch.randn(64, 1024, 1024)  # 256 MB: the write takes long enough to be killed inside it
print("writing", flush=True)
save_keyed({path!r}, "k", {{"x": big}})
print("written", flush=True)
time.sleep(60)
"""


def test_a_stage_killed_while_writing_leaves_nothing_taken_for_valid(tmp_path):
    """SIGKILL a process in the middle of writing a keyed output: the rerun finds no output under the
    final name (only a temp file of a dead process, which opening the folder removes), or, if the
    write had finished, a complete one that passes its content check: never a partial one."""
    from detector.artifacts import remove_stale_temps

    path = tmp_path / "out" / "stage.pt"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER.format(repo=str(REPO), path=str(path))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    from detector.artifacts import temp_path

    tmp = temp_path(path).with_name(temp_path(path).name.replace(f"_{os.getpid()}.tmp", f"_{proc.pid}.tmp"))
    deadline = time.time() + 120
    while not (tmp.is_file() and tmp.stat().st_size > 1 << 20) and not path.is_file() and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if path.is_file():  # the write finished first: what is there is complete
        assert verify(path) is None and load_keyed(path, "k") is not None
    else:
        assert tmp.is_file() and load_keyed(path, "k") is None
        assert remove_stale_temps(path.parent) == 1
    assert not list(path.parent.glob(".*.tmp"))


def test_device_auto_resolves_and_a_missing_gpu_is_named(tmp_path):
    from detector.config import ConfigError
    from detector.engine.run import resolve_device

    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'cuda:1'.*no CUDA device"):
            resolve_device("cuda:1")
    cfg = Config(output_dir=str(tmp_path / "run"), device="auto", data=DataConfig(root=str(tmp_path)))
    assert Run(cfg, argv=["test"]).cfg.device == resolve_device("auto")


def test_temp_files_of_other_machines_sharing_the_folder_are_kept(tmp_path):
    """In a job over several machines, a temp name carries its host and pid: only temps of dead
    processes of this machine are stale; another machine's live writer is never disturbed."""
    from detector.artifacts import _host, remove_stale_temps, temp_path

    mine = temp_path(tmp_path / "a.pt")
    assert mine.name == f".a.pt.{_host()}_{os.getpid()}.tmp"
    dead = tmp_path / f".b.pt.{_host()}_999999999.tmp"
    other = tmp_path / ".c.pt.some-other-node_1.tmp"
    legacy = tmp_path / ".d.pt.999999999.tmp"  # no host: this machine's
    for p in (mine, dead, other, legacy):
        p.write_bytes(b"x")
    assert remove_stale_temps(tmp_path) == 2
    assert mine.exists() and other.exists() and not dead.exists() and not legacy.exists()


class Allocates(Stage[int]):
    """A stage that holds ``mib`` MiB while it builds and frees it before it returns."""

    name = "allocates"

    def __init__(self, mib: int) -> None:
        super().__init__()
        self.mib = mib

    def settings(self) -> object:
        return {"mib": self.mib}

    def load(self) -> int | None:
        return None

    def build(self) -> int:
        block = torch.ones(self.mib * 2**18)  # float32: mib MiB, touched
        return int(block[-1]) + self.mib


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_each_stage_reports_its_own_peak_memory(tmp_path):
    cfg = Config(output_dir=str(tmp_path / "run"), data=DataConfig(root=str(tmp_path)))
    run = Run(cfg, log_name="log.txt", argv=["test"])
    run.stage(Allocates(300))
    big = run.peak_rss_mb["allocates"]
    small = Allocates(1)
    small.name = "small"
    run.stage(small)
    # the second stage's window starts after the first freed its 300 MiB: its peak is its own
    assert big - run.peak_rss_mb["small"] > 250
    # the process's peak still includes the first stage's, although the kernel's reset lowered
    # what getrusage reports (and so /usr/bin/time -v)
    assert peak_memory_mb() >= big


def _fingerprints(path: Path, stages: dict, **env) -> Path:
    path.mkdir()
    (path / "fingerprints.json").write_text(json.dumps({"stages": stages, "environment": env, "world_size": 1}))
    return path


def test_compare_runs_names_the_first_stage_that_differs(tmp_path):
    from detector.commands.compare_runs import main
    from detector.engine.compare_runs import compare_runs

    a = _fingerprints(tmp_path / "a", {"proposals": "p1", "pretrain": "t1", "cache": "c1"}, opencv_cpu_features="AVX2")
    b = _fingerprints(tmp_path / "b", {"proposals": "p1", "pretrain": "t2", "cache": "c2"},
                      opencv_cpu_features="AVX512")
    r = compare_runs(a, b)
    assert r.first_difference == "pretrain"
    assert r.environment == {"opencv_cpu_features": ("AVX2", "AVX512")}
    assert "part at stage 'pretrain'" in r.text()
    same = compare_runs(a, a / "fingerprints.json")
    assert same.first_difference is None and same.environment == {}
    # one run stopped early (--stop-after): the first stage it lacks is where they part
    c = _fingerprints(tmp_path / "c", {"proposals": "p1"}, opencv_cpu_features="AVX2")
    assert compare_runs(a, c).first_difference == "pretrain"
    assert main([str(a), str(a)]) == 0 and main([str(a), str(b)]) == 1
    assert main([str(tmp_path / "missing"), str(a)]) == 2
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "fingerprints.json").write_text("[1, 2]")
    assert main([str(tmp_path / "bad"), str(a)]) == 2


def test_weights_in_another_input_format_are_refused_before_any_work(tmp_path):
    """A weights file that declares RGB/ImageNet pixels while the config asks for the paper's BGR - 128
    ends training at once with a message naming the file and both formats (nothing is written)."""
    from detector.backbones import WeightsError, build_backbone
    from detector.config import load_config
    from detector.engine.train import train

    f = tmp_path / "rgb.pt"
    torch.save({"backbone": build_backbone("zf5", 0.125).state_dict(), "input_format": "rgb_imagenet"}, f)
    cfg = load_config(None, [f"backbone.weights={f}", "backbone.width_mult=0.125",
                             "backbone.input_format=bgr255_mean128", f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(WeightsError, match="rgb.pt: the weights were trained on input_format 'rgb_imagenet'"):
        train(cfg)
    assert not (tmp_path / "run").exists()
