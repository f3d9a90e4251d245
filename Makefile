# segserve — every target has a one-line description that `make help` prints.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        ?= .venv
PY          := $(VENV)/bin/python
CONFIG      ?= configs/default.yaml
RUN_DIR     ?= runs/default
MODEL_NAME  ?= segmenter
MODEL_VERSION ?= 1.0
BATCH_SIZE  ?= 8
MAX_BATCH_DELAY ?= 1
ARGS        ?=
# make export RUNTIMES=torchscript,onnx,onnx_int8 (default: the recipe's export.runtimes);
# make archive RUNTIME=torchscript|onnx|onnx_int8 (default auto: the fastest here that passed)
RUNTIMES    ?=
RUNTIME     ?= auto
NPROC       ?= 2
# make loadtest: the local `make serve` by default
HOST        ?= http://127.0.0.1:8080
GRPC_HOST   ?= 127.0.0.1:7070
USERS       ?= 4
SPAWN_RATE  ?= 2
DURATION    ?= 30s
# make loadtest: Locust worker processes under a local master (1: one process, no master)
PROCESSES   ?= 1
SLO_P95_MS  ?= 300
SLO_ERROR_RATE ?= 0.01

.PHONY: help install train train-ddp evaluate export card archive serve stop demo ui ui-tools ui-shot mlflow-ui test test-fast lint bench loadtest soak chaos k8s-tools k8s-sync k8s-validate k8s-deploy image image-ui image-tools clean

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m client.grpc_stubs
	touch $@

install: $(VENV)/.installed ## make .venv, install `.[dev]` (every extra in pyproject.toml) and the gRPC stubs

# The pipeline is file targets: a step runs only when its output is missing, so `make demo`
# after an interrupted or finished run picks up where it stopped. `make clean` starts over.
CKPT    := $(RUN_DIR)/checkpoints/best.pt
EXPORT  := $(RUN_DIR)/export/model.pt
MAR     := model_archives/$(MODEL_NAME).mar
SAMPLES := $(RUN_DIR)/samples
CARD    := $(RUN_DIR)/MODEL_CARD.md
# What the card is made of (those that exist): newer than the card means the card is stale.
CARD_INPUTS = $(wildcard $(RUN_DIR)/export/metadata.json $(RUN_DIR)/checkpoints/best.pt \
	$(RUN_DIR)/eval/metrics.json $(RUN_DIR)/metrics.jsonl)

train: install ## train the recipe CONFIG (default: the embedded synthetic dataset) into RUN_DIR
	$(PY) -m training train --config $(CONFIG) --run-dir $(RUN_DIR) $(ARGS)

train-ddp: install ## train CONFIG with torchrun on NPROC processes (DDP; gloo on CPU, nccl on GPU)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m training train \
		--config $(CONFIG) --run-dir $(RUN_DIR) $(ARGS)

evaluate: install ## evaluate RUN_DIR's best checkpoint: per-class table, confusion matrix, overlays
	$(PY) -m training evaluate --run-dir $(RUN_DIR)

export: install ## export RUN_DIR's best checkpoint, parity-checked per runtime (RUNTIMES=torchscript,onnx,onnx_int8)
	$(PY) -m training export --run-dir $(RUN_DIR) $(if $(RUNTIMES),--runtimes $(RUNTIMES))

card: install ## write RUN_DIR/MODEL_CARD.md: use, data, classes, metrics, input policy, latency, limitations, recipe
	$(PY) -m training card --run-dir $(RUN_DIR)

archive: install $(CARD) ## pack RUN_DIR/export's RUNTIME (default auto) + MODEL_CARD.md into model_archives/$(MODEL_NAME).mar (+ manifest)
	$(PY) -m serving.archive --export-dir $(RUN_DIR)/export --model-name $(MODEL_NAME) --runtime $(RUNTIME) \
		--model-card $(CARD) \
		--version $(MODEL_VERSION) --batch-size $(BATCH_SIZE) --max-batch-delay $(MAX_BATCH_DELAY) \
		$(if $(WORKERS),--min-workers $(WORKERS)) $(if $(THREADS),--threads $(THREADS)) \
		$(if $(DRIFT_EVERY_S),--drift-every-s $(DRIFT_EVERY_S)) \
		--out-dir model_archives

$(CKPT): | install
	$(PY) -m training train --config $(CONFIG) --run-dir $(RUN_DIR) $(ARGS)
$(RUN_DIR)/eval/metrics.json: $(CKPT)
	$(PY) -m training evaluate --run-dir $(RUN_DIR)
$(EXPORT): $(CKPT) $(RUN_DIR)/eval/metrics.json
	$(PY) -m training export --run-dir $(RUN_DIR) $(if $(RUNTIMES),--runtimes $(RUNTIMES))
$(MAR): $(EXPORT)
	$(MAKE) --no-print-directory archive
$(CARD): $(CARD_INPUTS) | install
	$(PY) -m training card --run-dir $(RUN_DIR)
$(SAMPLES): | install
	$(PY) -m training samples --out-dir $(SAMPLES) -n 4 --size 240 320

demo: $(MAR) $(SAMPLES) ## the main job: install, train, evaluate, export, archive, serve, predict (REST + gRPC), stop
	$(PY) -m serving.server start --config config.properties
	@rc=0; \
	$(PY) -m client predict $(SAMPLES)/val_0000.png --output mask --out-dir $(RUN_DIR)/demo/rest || rc=1; \
	$(PY) -m client predict $(SAMPLES)/val_0000.png --output overlay --out-dir $(RUN_DIR)/demo/rest || rc=1; \
	$(PY) -m client predict $(SAMPLES) --protocol grpc --output mask --out-dir $(RUN_DIR)/demo/grpc || rc=1; \
	$(PY) -m serving.server stop; \
	if [ $$rc = 0 ]; then echo "demo: predictions in $(RUN_DIR)/demo, metrics in $(RUN_DIR)/eval/per_class.md"; fi; \
	exit $$rc

serve: install ## start TorchServe with config.properties and wait until the model answers
	$(PY) -m serving.server start --config config.properties

stop: install ## stop TorchServe
	$(PY) -m serving.server stop

# make ui: the page against the running `make serve` (PROTOCOL=grpc for gRPC; UI_PORT)
PROTOCOL    ?= rest
UI_PORT     ?= 7860
ui: install ## the web page against a running TorchServe (PROTOCOL=rest|grpc, UI_PORT); prints its URL
	$(PY) -m ui --protocol $(PROTOCOL) --inference-url $(HOST) --grpc-target $(GRPC_HOST) \
		--port $(UI_PORT) --samples $(SAMPLES) $(ARGS)

ui-tools: install ## install Chromium + its matching chromedriver from the distro when missing (browser tests)
	$(PY) -c 'from ui.shot import ensure_browser; ensure_browser()'

ui-shot: $(MAR) $(SAMPLES) ui-tools ## screenshot of the page segmenting a sample (own TorchServe + page) into docs/ui.png
	$(PY) -m ui.shot --config config.properties --samples $(SAMPLES) --out docs/ui.png

# make mlflow-ui: the local tracking store every training run logs to (training/tracking.py);
# no job runner (MLflow's GenAI jobs: six more processes on these cores, not needed to browse)
MLFLOW_STORE ?= runs/mlruns
MLFLOW_PORT ?= 5000
mlflow-ui: install ## MLflow's web UI on the local tracking store MLFLOW_STORE (MLFLOW_PORT); prints its URL
	@mkdir -p $(MLFLOW_STORE)/artifacts
	@echo "MLflow UI on $(MLFLOW_STORE): http://127.0.0.1:$(MLFLOW_PORT)/  (Ctrl-C stops it)"
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(abspath $(MLFLOW_STORE))/mlflow.db \
		--default-artifact-root $(abspath $(MLFLOW_STORE))/artifacts \
		--host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

test: install k8s-tools image-tools ui-tools ## run the whole test suite (installs first when needed; builds the serving and web page images)
	$(PY) -m pytest

test-fast: install k8s-tools ## run the tests that neither train for long nor start TorchServe
	$(PY) -m pytest -m 'not slow'

lint: install ## ruff check + format check
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench: install ## benchmark: TorchScript floor vs segserve (REST/gRPC, batching on/off) vs a naive FastAPI peer
	$(PY) -m benchmarks.bench $(ARGS)

loadtest: install ## Locust REST+gRPC load test + SLO report (HOST GRPC_HOST USERS SPAWN_RATE DURATION SLO_P95_MS PROCESSES)
	$(PY) -m loadtest.run --host $(HOST) --grpc-host $(GRPC_HOST) --users $(USERS) \
		--spawn-rate $(SPAWN_RATE) --duration $(DURATION) --slo-p95-ms $(SLO_P95_MS) \
		--slo-error-rate $(SLO_ERROR_RATE) --processes $(PROCESSES) $(ARGS)

soak: DURATION = 10m
soak: install ## bounded Locust soak (DURATION=10m, USERS) + worker and frontend RSS slopes; needs `make archive`
	$(PY) -m loadtest.soak --duration $(DURATION) --users $(USERS) $(ARGS)

chaos: install ## kill a worker, overload the queue, time a request out, hostile traffic; prints figures (RUN_DIR)
	$(PY) -m loadtest.chaos --export-dir $(RUN_DIR)/export $(ARGS)

k8s-tools: install ## fetch kubectl (+kustomize) and promtool into .tools/bin
	$(PY) k8s/tools/toolchain.py

k8s-sync: ## refresh k8s/base/config/ (what kustomize reads) from config.properties + handler/metrics.yaml
	$(PY) k8s/tools/sync.py

image-tools: install ## install buildah + mmdebstrap from the distro when missing (what `make image` builds with)
	$(PY) k8s/tools/image.py tools

image: install ## build the serving image k8s/Dockerfile with buildah (no Docker daemon; installs buildah + mmdebstrap)
	$(PY) k8s/tools/image.py build $(ARGS)

image-ui: install ## build the web page's image (k8s/Dockerfile --target ui, no torch) with buildah: localhost/segserve-ui:dev
	$(PY) k8s/tools/image.py build --target ui $(ARGS)

k8s-validate: k8s-tools ## render every k8s overlay, validate it strictly, promtool check + test the alerts
	$(PY) k8s/tools/validate.py

OVERLAY ?= cpu
k8s-deploy: k8s-tools ## deploy OVERLAY=cpu|cpu-ui|gpu to the current kube context and smoke-test it
	$(PY) k8s/tools/deploy.py --overlay $(OVERLAY) $(ARGS)

clean: ## remove runs, archives and server logs (keeps .venv)
	rm -rf runs logs model_archives/*.mar model_archives/*.manifest.json key_file.json
