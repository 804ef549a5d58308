# The two commands: `make demo` and `make test`. Both create .venv and install once.
VENV   ?= .venv
PY     := $(VENV)/bin/python
DISTKD := $(VENV)/bin/distkd
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench bench-loader bench-train bench-cache bench-distill bench-sweep bench-faults clean

$(STAMP): requirements.txt pyproject.toml scripts/install.sh
	VENV=$(VENV) bash scripts/install.sh
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(DISTKD) demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: bench-loader bench-train bench-cache bench-distill bench-sweep

bench-loader: $(STAMP)
	$(PY) -m distkd.bench.loader

bench-train: $(STAMP)
	$(PY) -m distkd.bench.train

bench-cache: $(STAMP)
	$(PY) -m distkd.bench.cache

bench-distill: $(STAMP)
	$(PY) -m distkd.bench.distill

bench-sweep: $(STAMP)
	$(PY) -m distkd.bench.sweep

# every fault and bad input of README's Reliability table, run now, with each row's result
bench-faults: $(STAMP)
	$(PY) -m distkd.bench.faults

clean:
	rm -rf runs
