# Two commands on a fresh machine with Python 3.10+: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all faults install system-packages constraints clean

# constraints.txt pins every package to the versions the tests last passed with (reproducible installs).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip -c constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/coca demo --out runs/demo

# Java (COCO captioning scorers), g++ and ninja (DeepSpeed's JIT op): apt-get installs what is missing.
system-packages:
	@bash scripts/ensure-system-packages.sh

test: $(STAMP) system-packages
	$(BIN)/python -m pytest -q --durations=12
	$(BIN)/python scripts/faults.py

# Bad inputs and injected faults against every command; one table, every count but inputs 0.
faults: $(STAMP)
	$(BIN)/python scripts/faults.py

# Includes the tests marked slow.
test-all: $(STAMP) system-packages
	COCA_SLOW=1 $(BIN)/python -m pytest -q

# Newer releases: rewrite constraints.txt from an unconstrained install, then `make test` before committing it.
constraints:
	PYTHON=$(PYTHON) bash scripts/update-constraints.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
