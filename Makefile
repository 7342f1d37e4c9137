# diffjax: `make demo` trains the embedded default, `make test` runs the tests.
# Both create .venv at the repo root on first use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/digits
PYTEST_ARGS ?=

.PHONY: demo demo-latent test lint format clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(PY) launch/train.py --config=configs/digits.py --workdir=$(WORKDIR)
	$(PY) launch/sample.py --workdir=$(WORKDIR) --num_samples=100 --out=$(WORKDIR)/samples/demo.npz
	$(PY) launch/evaluate.py --workdir=$(WORKDIR)
	@echo
	@echo "Sample grid:  $(WORKDIR)/samples/demo.png"
	@echo "Evaluation:   $$(ls -1 $(WORKDIR)/eval/step_*.json | tail -n 1)"
	@cat $$(ls -1 $(WORKDIR)/eval/step_*.json | tail -n 1)

# The latent chain on the embedded digits: autoencoder -> latents -> latent diffusion ->
# decoded samples judged by the digits classifier (README: "Latent digits demo").
LATENT_WORKDIR ?= runs/digits_latent
demo-latent: $(VENV)/.installed
	$(PY) launch/train.py --config=configs/digits_vae.py --workdir=$(LATENT_WORKDIR)/vae
	$(PY) launch/export.py --workdir=$(LATENT_WORKDIR)/vae --out=$(LATENT_WORKDIR)/vae/export --overwrite
	$(PY) launch/encode_latents.py --vae=$(LATENT_WORKDIR)/vae/export --images=digits \
		--out=$(LATENT_WORKDIR)/latents --overwrite
	$(PY) launch/train.py --config=configs/digits_ldm.py --workdir=$(LATENT_WORKDIR)/ldm \
		--config.data.data_dir=$(LATENT_WORKDIR)/latents --config.latent.vae=$(LATENT_WORKDIR)/vae/export
	$(PY) launch/evaluate.py --workdir=$(LATENT_WORKDIR)/ldm
	@echo
	@echo "Sample grid:  $$(ls -1 $(LATENT_WORKDIR)/ldm/samples/step_*.png | tail -n 1)"
	@cat $$(ls -1 $(LATENT_WORKDIR)/ldm/eval/step_*.json | tail -n 1)

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadscope --durations=15 $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache

format: $(VENV)/.installed
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

clean-venv:
	rm -rf $(VENV)
