# kd-cache: distillation from cached teacher logits.
#   make distill                        venv + demo teacher + its logits + a student (MNIST-1D, CPU ok)
#   make distill PRESET=mnist1d METHOD=kd T=4 ALPHA=0.9 EPOCHS=40 SEED=1
#   make compare                        every method x 3 seeds from one cache -> data/reports/
#   make sweep ARGS="--grid temperature=1,2,4 --seeds 3 --mode one-pass"   grid -> data/sweeps/
#   make bench                          timings and sizes -> data/bench/bench.md
#   make bench-data                     datasets bigger than memory: workers, RSS at N and 8N, tokens
#   make distill NPROC=2                both stages under torchrun (2 processes)
#   make test                           the test suite
#   make docs                           the documentation site -> data/site/
#   make mutation                       do the tests catch seeded bugs? -> data/mutation/report.md
# Every target skips work already done (venv, teacher checkpoint, complete caches).

PYTHON ?= python3
VENV   ?= .venv
PRESET ?= mnist1d
METHOD ?=
T      ?=
ALPHA  ?=
EPOCHS ?=
SEED   ?=
ARGS   ?=
NPROC  ?= 1
TEST_JOBS ?= 2   # pytest-xdist workers: CI has 2 cores; TEST_JOBS=0 runs in one process

BIN := $(VENV)/bin
KD  := $(BIN)/kd
STAMP := $(VENV)/.installed

# NPROC > 1 runs the stage under torchrun (one process per GPU, or CPU processes with gloo).
RUN := $(if $(filter-out 1,$(NPROC)),$(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) -m stages.cli,$(KD))

# Make variables become CLI options only when set, so presets keep their defaults.
DISTILL_OPTS := $(if $(METHOD),--method $(METHOD)) $(if $(T),--temperature $(T)) \
                $(if $(ALPHA),--alpha $(ALPHA)) $(if $(EPOCHS),--epochs $(EPOCHS)) $(if $(SEED),--seed $(SEED))

.PHONY: setup train-teacher teacher teacher-logits distill compare sweep bench bench-scale bench-data test mutation lint docs clean-data

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

train-teacher: setup
	$(KD) train-teacher --preset $(PRESET)

teacher: train-teacher

teacher-logits: teacher
	$(RUN) teacher-logits --preset $(PRESET)

distill: teacher-logits
	$(RUN) distill --preset $(PRESET) $(DISTILL_OPTS) $(ARGS)

compare: teacher-logits
	$(KD) compare --preset $(PRESET) $(ARGS)

sweep: teacher-logits
	$(KD) sweep --preset $(PRESET) $(ARGS)

bench: teacher
	$(KD) bench $(ARGS)

# a 1,000,000 x 1,000 synthetic cache (2 GB, made once under data/bench/scale) read from disk, loopback S3
# and a memmap: rows/s, first batch, bytes, peak RSS -> data/bench/scale.md
bench-scale: setup
	$(KD) bench --workload scale $(ARGS)

# JPEG folders of N and 8N images read by DataLoader workers (made once under data/bench/data) and a 1 GB
# text tokenized into a token file: peak RSS, stage 1 vs a bare loop, KD vs CE epochs -> data/bench/data.md
bench-data: setup
	$(KD) bench --workload data $(ARGS)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n $(TEST_JOBS) $(ARGS)

# seeded mutations + mutmut over the core modules -> data/mutation/report.md (slow: not part of `make test`)
mutation: setup
	HF_HUB_OFFLINE=1 $(BIN)/python tests/mutation.py $(ARGS)

# the documentation site (docs/*.md, mkdocs.yml) -> data/site/index.html
docs: setup
	$(BIN)/mkdocs build --strict

lint: setup
	$(BIN)/ruff check pipeline stages tests
	$(BIN)/ruff format --check pipeline stages tests

clean-data:
	rm -rf data/teachers data/logits data/runs data/reports data/bench data/sweeps
