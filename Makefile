# The two README commands: `make demo` and `make test`. Both create .venv when it is missing and
# install the project into it; a second run reuses the venv and every cached output.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned to the pair that installs from local disk on the project machines;
# elsewhere pip downloads it.
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.installed

.PHONY: demo test venv clean-venv

venv: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q $(TORCH_PINS) 2>&1 | grep -v "is ignored" || true
	$(PY) -m pip install -q -e ".[test]" 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import torch, torchvision, cv2, sklearn, skimage, scipy, pycocotools, yaml, tqdm, matplotlib; cv2.ximgproc"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) tools/make_dataset.py --out data/digits

clean-venv:
	rm -rf $(VENV)
