# sfdiag: make demo | make test | make docs | make bench
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# This workplace's machines keep the CPU build of torch 2.13.0 on disk; pinning it there saves
# a multi-GB CUDA download. Elsewhere the pin is empty and pip installs a normal torch.
TORCH_WHEEL := $(firstword $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl))
TORCH_PIN := $(if $(TORCH_WHEEL),torch==2.13.0 --find-links $(dir $(TORCH_WHEEL)),)

.PHONY: demo test lint unit dogfood baselines bench docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(if $(TORCH_PIN),$(BIN)/pip install -q $(TORCH_PIN))
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(if $(TORCH_PIN),$(BIN)/pip install -q $(TORCH_PIN))
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

$(VENV)/.installed-docs: pyproject.toml | $(BIN)/python
	$(if $(TORCH_PIN),$(BIN)/pip install -q $(TORCH_PIN))
	$(BIN)/pip install -q -e '.[docs]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/sfdiag compare --optimizers adamw,sf-adamw,sf-ref,sf-sgd

LINTED := $(wildcard sfdiag tests bench examples)
lint: $(VENV)/.installed-dev
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

unit: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -n 2 --dist loadfile  # two workers, each test file on one (its fixtures built once)

# Dogfood: the repo's own example configs against their recorded baselines. A change to the
# in-repo optimizers or the probe that moves any metric fails here (and so in CI).
CONFIGS := default mnist weight-decay import-path
dogfood: $(VENV)/.installed-dev
	@for c in $(CONFIGS); do \
	  echo "sfdiag check configs/$$c.yaml --baseline baselines/$$c.json"; \
	  $(BIN)/sfdiag check configs/$$c.yaml --baseline baselines/$$c.json --quiet || exit 1; \
	done

# Re-record the baselines after an intended change (review the diff before committing it).
baselines: $(VENV)/.installed-dev
	@mkdir -p baselines
	@for c in $(CONFIGS); do \
	  $(BIN)/sfdiag baseline configs/$$c.yaml --output baselines/$$c.json --force || exit 1; \
	done

# The strict docs build runs before pytest: a broken link or a page missing from the nav fails
# fast, and tests/test_docs.py then finds the docs tools installed and builds the site too.
test: lint docs unit dogfood

# The docs site from docs/ into site/ (ignored); --strict: a broken link, a missing page or an
# API name that no longer resolves fails the build.
docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis site
