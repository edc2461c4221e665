# Two commands for a fresh machine:  `make demo` (set up, run the tiny cascade) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
PROMPT ?= 一个红色的球向右滚动

.PHONY: setup browser demo test bench clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

# The CPU build of torch goes in first, so the project's plain `torch` requirement is already met
# and no CUDA build is pulled (on a GPU machine, install the CUDA build of your choice instead).
$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)" || $(BIN)/pip install --quiet torch --index-url https://download.pytorch.org/whl/cpu
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/python run_cascade.py --prompt "$(PROMPT)"

# tests/test_report_page.py loads the live run page in Debian's chromium: installed here where apt is
# usable (as root); elsewhere that test skips, naming the package.
browser:
	@command -v chromium >/dev/null || ! command -v apt-get >/dev/null || [ "$$(id -u)" -ne 0 ] || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; } || \
		echo "could not install chromium: the live run page's browser test will skip"

test: setup browser
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/bench_dit.py
	$(BIN)/python bench/bench_vae.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
