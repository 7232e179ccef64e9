# TensorFlow/Keras reference pipelines. `make` (or `make help`) lists the targets.
#
# Two commands on a fresh machine, nothing installed by hand:
#   make train      # creates .venv, installs setup.cfg's pinned dependencies, trains cifar10_cnn
#   make test       # same environment, runs the fast test suite

PIPELINE ?= cifar10_cnn
STRATEGY ?= auto
WORKERS  ?= 2
ARGS     ?=
DATA     ?=
MODEL    ?=
CONFIG   ?=
RUNS     ?= 3
NAME     ?=
STAGES   ?= prune,pqat
TUNER    ?= hyperband
TRIALS   ?= 10
# Python 3.11 where there is one (the version tested most); else python3 (setup.cfg says which work).
PYTHON   ?= $(shell command -v python3.11 || echo python3)
# STACK: the pinned set `make install` puts in the environment (TPU=1 is STACK=tpu):
#   (none)  setup.cfg's pins, TensorFlow 2.21: CPU, and GPU with GPU=1 (the CUDA libraries
#           TensorFlow was built against, tensorflow[and-cuda])
#   tpu     requirements-tpu.txt: tensorflow-tpu 2.20.0 with an exact libtpu (TPU VMs, Colab's TPU
#           runtime: the plain tensorflow wheel cannot drive a TPU). Never import it on a machine
#           without a TPU: it asks the cloud metadata server for TPU settings and hangs.
#   tf2.20  the tpu set with plain tensorflow 2.20.0: `make test STACK=tf2.20` runs the tests on
#           the TPU set's versions on any machine
# Each stack gets its own virtual environment (.venv, .venv-tpu, .venv-tf2.20). VENV=none installs
# into PYTHON's own environment instead (Colab: its Python has no working venv, and a notebook's
# kernel should see the packages); pass the same STACK or TPU=1 to every make command there.
STACK    ?= $(if $(TPU),tpu)
ifneq ($(filter-out tpu tf2.20,$(STACK)),)
$(error STACK=$(STACK): expected tpu or tf2.20, or no STACK for setup.cfg's pins)
endif
VENV     ?= .venv$(if $(STACK),-$(STACK))
GPU      ?=
TF_VERSION := $(shell sed -n 's/^ *tensorflow==//p' setup.cfg)
TPU_PINS   := requirements-tpu.txt
# The stack's pins as pip arguments: the TPU set, with plain tensorflow in tensorflow-tpu's place
# and no libtpu (the tpu stack swaps them in afterwards; see requirements-tpu.txt).
STACK_PINS  = $$(grep -v '^\#' $(TPU_PINS) | sed -e '/^libtpu==/d' -e 's/^tensorflow-tpu==/tensorflow==/')
TPU_BUILD   = $$(grep -E '^(tensorflow-tpu|libtpu)==' $(TPU_PINS))
# setup.cfg's test extras (pytest, ruff, ...), for stacks installed without setup.cfg's pins.
TEST_EXTRAS = $$($(PYTHON) -c "import configparser; c = configparser.ConfigParser(); c.read('setup.cfg'); \
	print(' '.join(l for l in c['options.extras_require']['test'].splitlines() if l and not l.startswith('\#')))")
ifeq ($(VENV),none)
# Runtime packages only: the test extras (pytest, ipykernel, ...) would replace the notebook
# server's own kernel packages under a running Colab session.
PY       := $(PYTHON)
INSTALLED := .installed-$(notdir $(PYTHON))$(if $(STACK),-$(STACK))
EXTRAS   :=
# One Python holds one stack: `make train` without TPU=1 after `make install TPU=1` would lay
# setup.cfg's TensorFlow 2.21 over the TPU build.
OTHER_STACK := $(filter-out $(INSTALLED),$(wildcard $(addprefix .installed-$(notdir $(PYTHON)),-tpu -tf2.20) .installed-$(notdir $(PYTHON))))
ifneq ($(OTHER_STACK),)
ifneq ($(filter-out help lint clean-runs check-tpu-stack,$(or $(MAKECMDGOALS),help)),)
$(error $(PYTHON) already holds the stack marked by $(OTHER_STACK): pass the STACK it was installed with (TPU=1 for tpu) to every make command, or delete $(OTHER_STACK) to install over it)
endif
endif
else
PY       := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed$(if $(STACK),-$(STACK))
EXTRAS   := [test]
# On a TPU VM that installed only the TPU stack, a command without TPU=1 would build a CPU .venv
# and train on the CPU.
ifeq ($(STACK)$(VENV)$(wildcard .venv/.installed),.venv)
ifneq ($(wildcard .venv-tpu/.installed-tpu),)
ifneq ($(filter-out help install clean-runs check-tpu-stack,$(or $(MAKECMDGOALS),help)),)
$(error only the TPU stack is installed here (.venv-tpu): pass TPU=1 to every make command (make train TPU=1 ...), or run `make install` first for the CPU stack)
endif
endif
endif
endif
# Offline default: the shared copy of the dataset the pipeline reads with --data=tfds (its DATA_FORMAT's
# tfds_name, read from the file without importing anything) when it is beside this checkout, else TFDS.
# A pipeline whose tfds set has no copy here, or that names none, gets --data=tfds.
OFFLINE_cifar10      := ../shared/data/cifar10/cifar10-jpeg-train.tar.gz
OFFLINE_imdb_reviews := ../shared/data/imdb/aclImdb_v1_labeled.tar.gz
TFDS_NAME := $(shell awk '/^DATA_FORMAT *=/ {on = 1; print; next} on && /^[A-Za-z_@]/ {exit} on {print}' \
	pipelines/$(PIPELINE).py 2>/dev/null | sed -n -E "s/.*tfds_name *= *[\"']([^\"'/:]*).*/\1/p" | head -n 1)
OFFLINE_DATA := $(if $(TFDS_NAME),$(wildcard $(OFFLINE_$(TFDS_NAME))))
# --smoke in ARGS without DATA: no --data flag, so the pipeline's smoke data (synthetic) is used.
SMOKE_ARG := $(filter-out --smoke=false --smoke=False --smoke=0 --smoke=no --smoke=off,$(filter --smoke --smoke=%,$(ARGS)))
TRAIN_DATA := $(or $(DATA),$(if $(SMOKE_ARG),,$(or $(OFFLINE_DATA),tfds)))
DATA_FLAG := $(if $(TRAIN_DATA),--data=$(TRAIN_DATA))
# Multi-worker: every worker must open the same run folder, so the name is fixed here, once.
RUN_NAME := $(or $(NAME),$(if $(filter multiworker,$(STRATEGY)),$(shell date +%Y%m%d-%H%M%S)))
TRAIN_FLAGS := --strategy=$(STRATEGY) $(DATA_FLAG) $(if $(RUN_NAME),--name=$(RUN_NAME)) $(if $(CONFIG),--config=$(CONFIG)) $(ARGS)
# Local multi-worker runs put the workers in a private network namespace (TF's gRPC ports listen
# on every interface otherwise; strategies/launch_local.py), which has no way out: data that must
# be downloaded (tfds) or read from a URL needs the host network.
NETWORK ?= $(if $(filter tfds,$(TRAIN_DATA))$(findstring ://,$(TRAIN_DATA) $(ARGS)),host,private)
# TensorFlow's start-up logs: each pipeline silences them itself (core/startup_logs.py; errors still
# show), and shows them with ARGS=--verbose=2.

# A mistyped PIPELINE stops here with one line, not in Python's "No module named" traceback.
PIPELINES := $(sort $(basename $(notdir $(filter-out %/__init__.py,$(wildcard pipelines/*.py)))))
ifneq ($(filter train evaluate compress export tune bench bench-input,$(MAKECMDGOALS)),)
ifeq ($(filter $(PIPELINE),$(PIPELINES)),)
$(error PIPELINE=$(PIPELINE): no such pipeline; expected one of $(PIPELINES))
endif
endif

.DEFAULT_GOAL := help
.PHONY: help install check-tpu-stack train evaluate compress export tune bench bench-input lint test test-faults test-all clean-runs

help: ## list the targets (this text)
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo ""
	@echo "  variables: PIPELINE=$(PIPELINE) STRATEGY=$(STRATEGY) (auto|default|mirrored|multiworker|tpu)"
	@echo "             WORKERS=$(WORKERS) NETWORK=$(NETWORK) (multiworker on this machine: private|host) RUNS=$(RUNS) (bench) NAME=run-name"
	@echo "             DATA=... MODEL=... CONFIG=config.json STAGES=$(STAGES) ARGS=\"--key=value ...\""
	@echo "             TUNER=$(TUNER) (hyperband|bayesian|random) TRIALS=$(TRIALS) (tune)"
	@echo "             STACK=$(STACK) (none: setup.cfg, TF $(TF_VERSION) | tpu: $(TPU_PINS) | tf2.20: that set, plain TF) TPU=1 (STACK=tpu) GPU=1 (tensorflow[and-cuda])"
	@echo "             VENV=$(VENV) (none: install into PYTHON=$(PYTHON))"

install: $(INSTALLED) $(if $(GPU),$(INSTALLED)-gpu) ## create .venv and install setup.cfg's pins (STACK=tpu|tf2.20 or TPU=1: requirements-tpu.txt; VENV=none: into PYTHON)

$(INSTALLED): setup.cfg pyproject.toml $(if $(STACK),$(TPU_PINS))
ifneq ($(VENV),none)
	$(PYTHON) -m venv $(VENV)
endif
	$(PY) -m pip install --quiet --upgrade pip
ifeq ($(STACK),)
	$(PY) -m pip install --quiet -e '.$(EXTRAS)'
else
	$(PY) -m pip install --quiet $(STACK_PINS) $(if $(EXTRAS),$(TEST_EXTRAS))
	$(PY) -m pip install --quiet --no-deps -e .
endif
ifeq ($(STACK),tpu)
	$(PY) -m pip uninstall --quiet --yes tensorflow
	$(PY) -m pip install --quiet --no-deps --force-reinstall $(TPU_BUILD)
endif
	touch $@

$(INSTALLED)-gpu: $(INSTALLED)
ifneq ($(STACK),)
	$(error GPU=1 adds the CUDA libraries of setup.cfg's TensorFlow $(TF_VERSION); it does not combine with STACK=$(STACK))
endif
	$(PY) -m pip install --quiet 'tensorflow[and-cuda]==$(TF_VERSION)'
	touch $@

check-tpu-stack: ## install STACK=tpu into .venv-tpu, never importing it, and check libtpu exports what TF's TPU loader needs
	$(MAKE) --no-print-directory install STACK=tpu VENV=.venv-tpu
	$(PYTHON) deploy/check_tpu_stack.py .venv-tpu $(TPU_PINS)

train: install ## train PIPELINE under STRATEGY (multiworker: WORKERS local processes)
ifeq ($(STRATEGY),multiworker)
	$(PY) -m strategies.launch_local --workers=$(WORKERS) --network=$(NETWORK) -- $(PY) -m pipelines.$(PIPELINE) $(TRAIN_FLAGS)
else
	$(PY) -m pipelines.$(PIPELINE) $(TRAIN_FLAGS)
endif

evaluate: install ## accuracy of MODEL=runs/.../model.keras on DATA (a folder, .tar.gz or tfds), one JSON line
	$(PY) -m pipelines.$(PIPELINE) evaluate --model=$(MODEL) --data=$(or $(DATA),tfds) $(ARGS)

compress: install ## TFMOT STAGES (e.g. prune,ptq_int8,pqat) on MODEL=runs/.../model.keras; report in compress/ beside it
	$(PY) -m pipelines.$(PIPELINE) compress --model=$(MODEL) --stages=$(STAGES) $(ARGS)

export: install ## SavedModel of MODEL=runs/.../model.keras for TF Serving (raw images/strings in), in export/<version>/ beside it
	$(PY) -m pipelines.$(PIPELINE) export --model=$(MODEL) $(ARGS)

tune: install ## keras-tuner search over the pipeline's SEARCH_SPACE (TUNER=hyperband|bayesian|random TRIALS=N); rerun to resume
	$(PY) -m pipelines.$(PIPELINE) tune --tuner=$(TUNER) --trials=$(TRIALS) $(TRAIN_FLAGS)

bench: install ## repeat the training RUNS times (seeds 0..RUNS-1) and print the BENCHMARKS.md row
	$(PY) -m core.training.benchmark --pipeline=$(PIPELINE) --runs=$(RUNS) -- $(TRAIN_FLAGS)

bench-input: install ## input pipeline throughput: storage bound, naive, tuned, ablation, remote, train step (input_bench.md)
	$(PY) -m pipelines.$(PIPELINE) bench-input $(DATA_FLAG) $(ARGS)

lint: install ## ruff: the formatter's check and the lint rules (pyproject.toml)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

test: install ## the fast test suite (under 15 minutes on 2 cores)
	$(PY) -m pytest -m "not slow" $(ARGS)

test-faults: install ## fault injection: killed workers, kills inside checkpoint saves, full disk, NaN, damaged data (RELIABILITY.md)
	$(PY) -m pytest -m faults $(ARGS)

test-all: install ## every test, slow and fault-injection ones included
	$(PY) -m pytest $(ARGS)

clean-runs: ## delete runs/ and the converted-data cache .cache/ (asks first)
	@read -p "delete runs/ and .cache/? [y/N] " answer && [ "$$answer" = y ] && rm -rf runs .cache || true
