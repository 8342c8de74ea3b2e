# The two README commands: `make demo` and `make test`. Both create .venv when it is missing and
# install the project into it (pip install -e ".[test]" from pyproject.toml, which also puts the
# `sppnet` command in .venv/bin); a second run reuses the venv and every cached output.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the pair that installs from local disk on the project machines;
# elsewhere pip downloads it.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean-venv

venv: $(STAMP)

# Each pip step is tried up to three times and fails the target when the last try fails: CI once
# lost a 73 MB wheel download six times in a row, and a step that failed quietly left a torch
# without its libraries. pip's own notes about absent local index folders are filtered out.
SHELL := /bin/bash
PIP_TRIES := 3
define pip_install
for try in $$(seq $(PIP_TRIES)); do \
	$(PY) -m pip install -q --retries 10 --timeout 60 $(1) 2>&1 | { grep -v "is ignored" || true; }; \
	test $${PIPESTATUS[0]} -eq 0 && break; \
	test $$try -lt $(PIP_TRIES) || { echo "make: pip install $(1) failed $(PIP_TRIES) times" >&2; exit 1; }; \
	echo "make: pip install $(1) failed (try $$try of $(PIP_TRIES)); trying again in 20 s" >&2; sleep 20; \
done
endef

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(call pip_install,--upgrade pip)
	@$(call pip_install,--resume-retries 20 $(TORCH_PINS))
	@$(call pip_install,--resume-retries 20 -e '.[test]')
	$(PY) -c "import torch, torchvision, cv2, sklearn, skimage, scipy, pycocotools, yaml, tqdm, matplotlib; cv2.ximgproc"
	touch $(STAMP)

# One pytest worker per core, at most 4 (pytest-xdist): the suite's tests are mostly one-thread
# models and subprocesses, so 2 workers take 418 s where one took 587-665 s on 2 cores.
PYTEST_WORKERS ?= auto
test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --maxprocesses 4 tests

# The main job on the embedded data set: make data -> classifier pre-training -> detector training
# -> test (per-class table, mAP line, timing table) -> a demo picture. Every stage caches its
# output, so a second run only re-tests.
# The same commands as the README's (`sppnet ...`, installed into the venv by pip).
SPPNET := $(VENV)/bin/sppnet
DEMO_CFG ?= configs/digits_zf5.yaml
DEMO_RUN ?= runs/digits_zf5
demo: $(STAMP)
	$(SPPNET) make-digits --out data/digits
	$(SPPNET) train --config $(DEMO_CFG)
	$(SPPNET) test --config $(DEMO_CFG)
	$(SPPNET) demo --checkpoint $(DEMO_RUN)/model.pt \
		data/digits/JPEGImages/$$(head -n 1 data/digits/ImageSets/Main/test.txt).jpg --out $(DEMO_RUN)/demo.png

clean-venv:
	rm -rf $(VENV)
