# The two commands of the README. Each bootstraps .venv when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: demo test venv clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# The main job: the whole recipe on the tiny default and the demo corpus, with the report (configs/pipeline.yaml).
demo: $(STAMP)
	$(VENV)/bin/omni-lightning pipeline --config configs/pipeline.yaml --out $(DEMO_OUT)

# The test suite (about 10 minutes on 2 CPU cores at most).
test: $(STAMP)
	$(PY) -m pytest -q

clean-demo:
	rm -rf $(DEMO_OUT)
