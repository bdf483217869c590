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

# As root with apt: `apt-get install` the Debian packages $(2) unless every command of $(1) is there already;
# otherwise run $(3), the fallback (a message, or another way to get them).
CAN_APT := [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null
debian = missing=; for tool in $(1); do command -v $$tool >/dev/null || missing=$$tool; done; [ -z "$$missing" ] || { \
	  if $(CAN_APT); then apt-get update -q && apt-get install -y -q $(2); else $(3); fi; }

# Fashion-MNIST: Debian's package when we are root with apt, else torchvision's downloader.
data: setup
	@$(PY) -m objectives locate >/dev/null 2>&1 || { \
	  if $(CAN_APT); then \
	    apt-get update -q && apt-get install -y -q dataset-fashion-mnist; \
	  else \
	    $(PY) -m pip install -q -c constraints.txt -e '.[download]' && $(PY) -m objectives download; \
	  fi; }
	@$(PY) -m objectives locate

# Headless Chromium for the report and UI tests (Debian's, driven by Playwright).
browser:
	@$(call debian,chromium,chromium,echo "chromium not found: install it; until then the browser tests are skipped")

# tmux, a real terminal for tests/test_progress.py's terminal tests (slow, so only `make test`).
terminal:
	@$(call debian,tmux,tmux,echo "tmux not found: install it; until then the terminal tests fail")

# A one-node Slurm for tests/test_slurm.py (slow, so only `make test`): Debian's slurm-wlm and munge.
slurm:
	@$(call debian,slurmd munged,slurm-wlm munge,echo "slurmd or munged not found: install slurm-wlm and munge; until then the Slurm test is skipped")

clean:
	rm -rf $(VENV) studies
