# Two commands on a fresh machine with Python 3.10+: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all install java clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/coca demo --out runs/demo

# Java runs the COCO captioning scorers (PTB tokenizer, METEOR, SPICE); installed with apt-get if missing.
java:
	@bash scripts/ensure-java.sh

test: $(STAMP) java
	$(BIN)/python -m pytest -q

# Includes the tests marked slow.
test-all: $(STAMP) java
	COCA_SLOW=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
