# The commands: `make demo`, `make test` and `make docs` (the API reference, docs/api/index.html).
# Each creates .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/shakespeare_char

.PHONY: demo test docs install bench clean

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m train.pretrain_gpt --config=configs/gpt.py:shakespeare_char --workdir=$(WORKDIR) \
		--config.sample.num_tokens=0
	$(PY) -m train.sample --workdir=$(WORKDIR) --prompt="ROMEO:" --max_new_tokens=300 \
		--temperature=0.8 --top_k=40

test: $(VENV)/.installed
	$(PY) -m pytest tests -n 2 -rs --durations=25

# pdoc, from the docstrings; a warning about an fmjax object fails it (docs/build.py says which).
docs: $(VENV)/.installed
	$(PY) docs/build.py --output docs/api

bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[bench]' torch==2.13.0
	$(PY) bench/train_speed.py --model gpt --size small

clean:
	rm -rf $(VENV) workdirs docs/api
