# The two commands of the README. Each bootstraps .venv when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYSDEPS := $(VENV)/.sysdeps
DEMO_OUT ?= runs/demo

.PHONY: demo test venv clean-demo

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# mteb's audio and video decoding needs FFmpeg's shared libraries: installed here when we may (root with
# apt-get); otherwise the tests that need them are skipped with a message naming what to install.
$(SYSDEPS): $(STAMP)
	@command -v ffmpeg >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null; } || \
	  echo "note: ffmpeg is not installed (apt-get install ffmpeg): the mteb audio/video tests will be skipped"
	@touch $(SYSDEPS)

# The main job: the whole recipe on the tiny default and the demo corpus, with the report (configs/pipeline.yaml).
demo: $(STAMP)
	$(VENV)/bin/omni-lightning pipeline --config configs/pipeline.yaml --out $(DEMO_OUT)

# The test suite (about 10 minutes on 2 CPU cores at most).
test: $(STAMP) $(SYSDEPS)
	$(PY) -m pytest -q

clean-demo:
	rm -rf $(DEMO_OUT)
