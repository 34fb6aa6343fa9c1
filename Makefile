# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment it needs (.venv) from constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[lab,test,lint,lightning,models]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/teleport run --out runs/demo

test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -p no:cacheprovider --hypothesis-profile=ci

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m torch_teleport.lab.benchmarks.step_cost

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
