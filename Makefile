# The two commands: `make demo` and `make test` (`make test-fast`: the unit tests alone).
# Both create .venv and install once.
# STACK picks the pinned stack (scripts/stacks/STACK.txt): torch2.13, the default and CI's, in .venv;
# torch2.11 (the GPU image's) in .venv-torch2.11, e.g. `make test STACK=torch2.11`.
STACK  ?= torch2.13
VENV   ?= $(if $(filter torch2.13,$(STACK)),.venv,.venv-$(STACK))
PY     := $(VENV)/bin/python
DISTKD := $(VENV)/bin/distkd
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-fast docs gpu-pack bench bench-quick bench-stages bench-loader bench-train bench-cache bench-distill bench-sweep bench-faults bench-vs bench-topk bench-daily bench-large-teacher bench-staleness bench-realdata clean

$(STAMP): requirements.txt scripts/stacks/$(STACK).txt pyproject.toml scripts/install.sh
	STACK=$(STACK) VENV=$(VENV) bash scripts/install.sh
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(DISTKD) demo

# --durations: the slowest tests end the output, so a CI log says where the suite's time went.
test: $(STAMP)
	$(PY) -m pytest -q --durations=25 tests

# The unit tests alone (-m unit: pure, no processes, Ray or ranks): a few minutes on 2 cores.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m unit tests

# docs/jobs.md, the job file reference, from the job dataclasses (tests/test_docs.py checks it is current)
docs: $(STAMP)
	$(PY) -m distkd.config_reference --out docs/jobs.md

# Every benchmark on one generated dataset, in one run, into BENCHMARKS.md (+ PNG plots).
# BENCH_SCALE=rows sets the dataset's size (default 3,000,000: under an hour on 2 cores).
bench: $(STAMP)
	$(PY) -m distkd.bench.suite --out BENCHMARKS.md

# A tiny run of the same suite (structure only; its figures mean nothing).
bench-quick: $(STAMP)
	$(PY) -m distkd.bench.suite --quick --out runs/bench/BENCHMARKS-quick.md --work runs/bench/suite-quick

# The stage benchmarks one by one, each on its own data (what `make bench` was before the suite).
bench-stages: bench-loader bench-train bench-cache bench-distill bench-sweep

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

# bench-train and bench-distill of this tree against commit BASE's, interleaved in one run
# (issue 11: measured against a7fd55f, the trainer rework's parent, and 2dfa3e6; see docs/benchmarks.md)
BASE ?= HEAD~1
bench-vs: $(STAMP)
	$(PY) -m distkd.bench.vs $(BASE)

# next-item: eta and cache bytes against k and the sampled tail (TOPK_ROWS=200000: a scaled copy)
bench-topk: $(STAMP)
	$(PY) -m distkd.bench.next_item_k $(if $(TOPK_ROWS),--rows $(TOPK_ROWS)) --seeds 2

# ten synthetic days through `distkd daily`, warm-started against from scratch (docs/daily.md)
bench-daily: $(STAMP)
	$(PY) -m distkd.bench.daily

# A 4.3 GiB teacher: sharded vs gathered export, K = 1 vs K = 2 cache builds (peak RSS, rows/s); ~25 min, 14 GiB
bench-large-teacher: $(STAMP)
	$(PY) -m distkd.bench.large_teacher

# students of a 1-, 7- and 14-day-old teacher on drifting days: KD, KD+age, KD+adapter against hard
# (docs/daily.md#a-stale-teacher); the table in runs/bench/staleness/table.md
bench-staleness: $(STAMP)
	$(PY) -m distkd.bench.staleness

# ml-latest-small (privileged) and the Instacart sample: each teacher kind's KD student against the
# hard one, searched alike (fifo), 5 seeds on test, paired intervals, into docs/realdata.md
bench-realdata: $(STAMP)
	$(PY) -m distkd.bench.realdata $(if $(REALDATA_SAMPLES),--samples $(REALDATA_SAMPLES))

# every fault and bad input of docs/reliability.md's table, run now, with each row's result;
# then the cache build's process faults at scale (FAULT_ROWS rows, default 1,000,000; 16 shards)
bench-faults: $(STAMP)
	$(PY) -m distkd.bench.faults
	$(PY) -m distkd.bench.faults_scale $(if $(FAULT_ROWS),--rows $(FAULT_ROWS))

# The GPU run's wheels (torch2.11 stack, CUDA fbgemm-gpu in parts) and its prebuilt logs and cache,
# into .gpu/ (docs/gpu.md). Uses the default stack (Ray builds the cache).
gpu-pack: $(STAMP)
	PYTHON=$(PY) bash scripts/gpu_pack.sh

clean:
	rm -rf runs
