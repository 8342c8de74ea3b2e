"""Importing detector turns on PyTorch's huge-page allocation of large CPU tensors
(``THP_MEM_ALLOC_ENABLE``, detector/__init__.py) unless the user set the variable: checked in fresh
interpreters against the kernel's own accounting (/proc/self/smaps, AnonHugePages of the mapping
that holds a 64 MB tensor)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")

PROBE = r"""
import json, os, sys
import detector
import torch
t = torch.empty(16 << 20).fill_(1.0)  # 64 MB, written: every page is faulted in
a = t.data_ptr()
huge = 0
with open("/proc/self/smaps") as f:
    inside = False
    for line in f:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= a < hi
        elif inside and head == "AnonHugePages:":
            huge = int(line.split()[1])
print(json.dumps({"env": os.environ.get("THP_MEM_ALLOC_ENABLE"), "defaulted": detector.HUGE_PAGES_DEFAULTED,
                  "huge_kb": huge}))
"""


def _mode() -> str | None:
    if not sys.platform.startswith("linux") or not THP_MODE.exists():
        return None
    text = THP_MODE.read_text()
    return text[text.index("[") + 1:text.index("]")]


def _probe(env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_mode() not in ("always", "madvise"), reason="the kernel's transparent huge pages are off")
def test_import_turns_on_huge_pages_unless_the_user_chose():
    on = _probe(None)
    assert on["env"] == "1" and on["defaulted"] is True
    assert on["huge_kb"] >= 2048  # the tensor's mapping is backed by at least one 2 MB page
    user_on = _probe("1")
    assert user_on["env"] == "1" and user_on["defaulted"] is False and user_on["huge_kb"] >= 2048
    off = _probe("0")
    assert off["env"] == "0" and off["defaulted"] is False
    if _mode() == "madvise":  # huge pages only where asked for: the user's 0 leaves 4 KiB pages
        assert off["huge_kb"] == 0
