# Two-stage feature-cache pipeline. `make help` lists the targets.
# Every target creates .venv and installs what it needs the first time.

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
DATASET     ?= vehicles
MODEL       ?=
LAYERS      ?= penultimate
LAYER       ?= penultimate
WEIGHTS     ?=
HEAD        ?= softmax
POOLING     ?=
DATA_DIR    ?= data
FEATURES_DIR ?= features
REPORTS_DIR ?= reports
DEVICE      ?= auto
PRECISION   ?= auto
ENGINE      ?= local
RAY_ADDRESS ?=
RAY_DATA    ?= shared
BATCH       ?=
WORKERS     ?=
DECODE      ?= cpu
COMPILE     ?=
SHARED      ?= ../shared
# The torch/torchvision pair installed into .venv (pyproject admits 2.11-2.14 / 0.26-0.29).
TORCH_PIN   ?= torch==2.14.1 torchvision==0.29.2

CLI := $(PY) -m pipeline
opt = $(if $(2),$(1) $(2))
# DROP_DUPLICATES=1 drops, =0 keeps; unset: as the cache was made.
DUPLICATES_OPT = $(if $(filter 1 yes true,$(DROP_DUPLICATES)),--drop-duplicates,$(if $(filter 0 no false,$(DROP_DUPLICATES)),--keep-duplicates))
ENGINE_OPTS = --engine $(ENGINE) $(call opt,--ray-address,$(RAY_ADDRESS)) --ray-data $(RAY_DATA)
# Ray is installed only when ENGINE=ray asks for it (and for the tests).
ENGINE_DEPS = $(if $(filter ray,$(ENGINE)),$(VENV)/.ray) $(if $(filter device,$(DECODE)),$(VENV)/.gpu)

.PHONY: help venv extract train-head report predict taps demo test test-fast sweep bench bench-heads clean

help:
	@echo "make extract    DATASET=vehicles [MODEL=vgg16] [LAYERS=penultimate] [WEIGHTS=default|none|file.pth] [DATA_DIR=data] [FEATURES_DIR=features] [DEVICE=auto] [PRECISION=auto] [BATCH=..] [WORKERS=..] [UPDATE=1|REBUILD=1] [DROP_DUPLICATES=1|0] [DECODE=cpu|device] [COMPILE=1] [ENGINE=local|ray] [RAY_ADDRESS=auto|host:port] [RAY_DATA=shared|driver]"
	@echo "make train-head HEAD=svm|softmax|linear [DATASET=vehicles] [MODEL=..] [WEIGHTS=..] [LAYER=penultimate|auto|name] [FEATURES_DIR=..] [SOLVER=auto|torch|sklearn] [MEMORY_BUDGET=4G: default a quarter of RAM]"
	@echo "make sweep      DATASET=.. MODEL=.. [HEAD=softmax] [WEIGHTS=..] [POOLING=avg|max|avgmax|gridK] [UPDATE=1|REBUILD=1] [DROP_DUPLICATES=1|0] [COMPILE=1]  (every standard tap; choose the layer on val)"
	@echo "make report     [FEATURES_DIR=features] [REPORTS_DIR=reports]"
	@echo "make predict    HEAD_FILE=features/<dataset>/heads/<...>.h5 INPUTS='photos/' [OUT=predictions.csv] [WEIGHTS=..: if moved] [BATCH=..] [COMPILE=1]"
	@echo "make taps       MODEL=resnet50"
	@echo "make demo       [DATASET=digits] [MODEL=vgg16] [WEIGHTS=default]: extract, the three heads, report"
	@echo "make test       the test suite (real data from SHARED=$(SHARED))"
	@echo "make bench      stage-one speed and memory against the ceiling and the tutorial loop [DECODE=device] [COMPILE=1] [LARGE_FACTOR=10: the long run, N x this] [ENGINE=ray: Ray against local]"
	@echo "make bench-heads [SIZES=10000,100000,1000000] [FASHION=60000,3000] [CACHES='a.h5 b.h5@features.14']  stage-two speed, memory, accuracy (SIZES= : no synthetic caches)"

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

$(VENV)/.ray: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[ray]'
	touch $@

$(VENV)/.gpu: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[gpu]'
	touch $@

extract: venv $(ENGINE_DEPS)
	$(CLI) extract --dataset $(DATASET) --model $(or $(MODEL),vgg16) --layers $(LAYERS) --weights $(or $(WEIGHTS),default) \
	  --data-dir $(DATA_DIR) --features-dir $(FEATURES_DIR) --device $(DEVICE) --precision $(PRECISION) \
	  $(call opt,--batch-size,$(BATCH)) $(call opt,--workers,$(WORKERS)) --decode $(DECODE) $(if $(COMPILE),--compile) \
	  $(if $(UPDATE),--update) $(if $(REBUILD),--rebuild) $(DUPLICATES_OPT) $(ENGINE_OPTS)

train-head: venv
	$(CLI) train-head --head $(HEAD) --dataset $(DATASET) --layer $(LAYER) --features-dir $(FEATURES_DIR) \
	  $(call opt,--model,$(MODEL)) $(call opt,--weights,$(WEIGHTS)) $(call opt,--solver,$(SOLVER)) \
	  $(call opt,--memory-budget,$(MEMORY_BUDGET))

sweep: venv $(ENGINE_DEPS)
	$(CLI) sweep --dataset $(DATASET) --model $(or $(MODEL),vgg16) --weights $(or $(WEIGHTS),default) --head $(HEAD) \
	  $(call opt,--pooling,$(POOLING)) $(if $(UPDATE),--update) $(if $(REBUILD),--rebuild) $(DUPLICATES_OPT) --data-dir $(DATA_DIR) --features-dir $(FEATURES_DIR) --reports-dir $(REPORTS_DIR) --device $(DEVICE) \
	  --precision $(PRECISION) $(call opt,--batch-size,$(BATCH)) $(call opt,--workers,$(WORKERS)) --decode $(DECODE) $(if $(COMPILE),--compile) \
	  $(ENGINE_OPTS)

report: venv
	$(CLI) report --features-dir $(FEATURES_DIR) --reports-dir $(REPORTS_DIR) --data-dir $(DATA_DIR)

predict: venv $(ENGINE_DEPS)
	$(if $(and $(HEAD_FILE),$(INPUTS)),,$(error make predict needs HEAD_FILE= (a head from make train-head, \
	  features/<dataset>/heads/*.h5) and INPUTS= (image files or folders)))
	$(CLI) predict $(HEAD_FILE) $(INPUTS) --out $(or $(OUT),predictions.csv) $(call opt,--weights,$(WEIGHTS)) \
	  --device $(DEVICE) $(call opt,--batch-size,$(BATCH)) $(if $(COMPILE),--compile) $(ENGINE_OPTS)

taps: venv
	$(CLI) taps $(or $(MODEL),vgg16)

# The whole path on the embedded default (scikit-learn's digits, no download of data).
demo: DATASET = digits
demo: venv
	$(MAKE) --no-print-directory extract DATASET=$(DATASET)
	$(MAKE) --no-print-directory train-head HEAD=svm DATASET=$(DATASET) MODEL=$(or $(MODEL),vgg16) WEIGHTS=$(or $(WEIGHTS),default)
	$(MAKE) --no-print-directory train-head HEAD=softmax DATASET=$(DATASET) MODEL=$(or $(MODEL),vgg16) WEIGHTS=$(or $(WEIGHTS),default)
	$(MAKE) --no-print-directory train-head HEAD=linear DATASET=$(DATASET) MODEL=$(or $(MODEL),vgg16) WEIGHTS=$(or $(WEIGHTS),default)
	$(MAKE) --no-print-directory report

test: venv $(VENV)/.ray $(VENV)/.gpu
	PIPELINE_SHARED=$(SHARED) $(PY) -m pytest -q

test-fast: venv $(VENV)/.ray $(VENV)/.gpu
	PIPELINE_SHARED=$(SHARED) $(PY) -m pytest -q -m "not e2e"

bench-heads: venv
	$(PY) benchmarks/heads.py $(if $(filter undefined,$(origin SIZES)),,--sizes '$(SIZES)') $(call opt,--fashion,$(FASHION)) $(foreach c,$(CACHES),--cache $(c)) \
	  --shared $(SHARED) --reports-dir $(REPORTS_DIR)

bench: venv $(ENGINE_DEPS)
ifeq ($(ENGINE),ray)
	$(PY) benchmarks/ray_engine.py $(call opt,--model,$(MODEL)) $(call opt,--images,$(IMAGES)) --shared $(SHARED) --reports-dir $(REPORTS_DIR) --precision $(PRECISION) $(call opt,--address,$(RAY_ADDRESS))
else
	$(PY) benchmarks/stage_one.py $(call opt,--model,$(MODEL)) $(call opt,--images,$(IMAGES)) --shared $(SHARED) --reports-dir $(REPORTS_DIR) --device $(DEVICE) --precision $(PRECISION) --decode $(DECODE) $(if $(COMPILE),--compile) $(call opt,--large-factor,$(LARGE_FACTOR))
endif

clean:
	rm -rf $(REPORTS_DIR) .pytest_cache
