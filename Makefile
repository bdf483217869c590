# The two commands of the README:
#   make demo   set up, then run the main study end to end and write its report
#   make test   set up, then run the test suite
#   make test-fast   the same without the tests marked slow (soaks, repeated launches), for a quick answer
VENV    ?= .venv
PY      := $(VENV)/bin/python
TRIALS  ?= 50
# The demo stops starting trials after this many minutes (0: no limit); `make demo` again continues the study.
# 6: with a fresh set-up (3-4 minutes) and the last trial (up to 2 minutes on two AVX2 cores) it ends inside 12.
DEMO_MINUTES ?= 6
STAMP   := $(VENV)/.installed

.PHONY: demo test test-fast setup data browser terminal slurm clean

demo: setup data
	$(PY) -m study launch vgg_ratio --trials $(TRIALS) $(if $(filter-out 0,$(DEMO_MINUTES)),--timeout $$(( $(DEMO_MINUTES) * 60 )))
	$(PY) -m study show vgg_ratio --top 5

# One pytest process per core (at most 4), a test file per process at a time (module fixtures are not duplicated).
# More processes than cores measured no faster here: the suite is CPU-bound (benchmarks/RESULTS.md).
PYTEST  := $(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

test: setup data browser terminal slurm
	$(PYTEST)

test-fast: setup data browser
	$(PYTEST) -m "not slow"

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[test,ray]'
	touch $@

# Fashion-MNIST: Debian's package when we are root with apt, else torchvision's downloader.
data: setup
	@$(PY) -m objectives locate >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && apt-get install -y -q dataset-fashion-mnist; \
	  else \
	    $(PY) -m pip install -q -c constraints.txt -e '.[download]' && $(PY) -m objectives download; \
	  fi; }
	@$(PY) -m objectives locate

# Headless Chromium for the report and UI tests (Debian's, driven by Playwright).
browser:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && apt-get install -y -q chromium; \
	  else \
	    echo "chromium not found: install it, or browser tests are skipped"; \
	  fi; }

# tmux, a real terminal for tests/test_progress.py's terminal tests (slow, so only `make test`).
terminal:
	@command -v tmux >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && apt-get install -y -q tmux; \
	  else \
	    echo "tmux not found: install it, or the terminal tests fail"; \
	  fi; }

# A one-node Slurm for tests/test_slurm.py (slow, so only `make test`): Debian's slurm-wlm and munge.
slurm:
	@command -v slurmd >/dev/null && command -v munged >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -q && apt-get install -y -q slurm-wlm munge; \
	  else \
	    echo "slurmd or munged not found: install slurm-wlm and munge, or the Slurm test is skipped"; \
	  fi; }

clean:
	rm -rf $(VENV) studies
