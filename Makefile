# facexplain — the two commands a fresh machine needs: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WEIGHTS := .weights/face-api-1.7.15/model/face_recognition_model-weights_manifest.json
HUMAN_WEIGHTS := .weights/human-models-3.0.4/models/faceres.json
FACEPLUGIN_WEIGHTS := .weights/faceplugin-0.0.1/model/fr_feature.onnx
PROTOS := $(wildcard protos/facexplain/v1/*.proto)
PROTO_STAMP := services/api/v1/.generated

.PHONY: setup proto test demo bench lint clean k8s-validate

setup: $(STAMP) $(WEIGHTS) $(HUMAN_WEIGHTS) $(FACEPLUGIN_WEIGHTS) $(PROTO_STAMP)  ## install system packages, the venv, the weights; generate the API

$(STAMP): requirements.lock pyproject.toml
	scripts/setup_system.sh $(if $(filter 1,$(FACEXPLAIN_WITH_PODMAN)),--podman)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade "pip<27"
	scripts/install_lock.sh $(VENV) requirements.lock
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

$(WEIGHTS):
	scripts/fetch_weights.sh

$(HUMAN_WEIGHTS):
	scripts/fetch_human_models.sh

$(FACEPLUGIN_WEIGHTS):
	scripts/fetch_faceplugin.sh

$(PROTO_STAMP): $(PROTOS) scripts/gen_protos.py $(STAMP)
	$(BIN)/python scripts/gen_protos.py
	touch $@

proto: $(PROTO_STAMP)  ## regenerate Python code from protos/

test: setup  ## the whole suite: fast tests first, then real servers on loopback
	$(BIN)/pytest -q -m "not integration" --durations=15 tests
	$(BIN)/pytest -q -m integration --durations=25 tests

demo: setup  ## registry with the shipped models, all five services, an audit of the bundled sample faces, stop
	$(BIN)/python scripts/demo.py

bench: setup  ## benchmarks (not tests): writes bench/results/*.json
	$(BIN)/python bench/bench_embedding.py

LINT_DIRS := $(wildcard facexplain registry services training sdk cli scripts tests bench)

k8s-validate: setup  ## render k8s/ overlays + training kustomizations, validate strictly against Kubernetes 1.31, check policy
	$(BIN)/python scripts/k8s_policy.py

lint:  ## ruff (lint + format check), the import layers (scripts/check_layers.py) and mypy
	$(BIN)/ruff check $(LINT_DIRS)
	$(BIN)/ruff format --check $(LINT_DIRS)
	$(BIN)/python scripts/check_layers.py
	$(BIN)/mypy facexplain registry services training sdk cli


clean:
	rm -rf $(VENV) .weights services/api/v1/*_pb2*.py* $(PROTO_STAMP)

# -- Model registry (MLflow tracking server + Model Registry on loopback; see README "Model registry") ------
# Settings: mlflow/server.env (overridable by the environment, e.g. `MLFLOW_PORT=5001 make mlflow`).
.PHONY: mlflow mlflow-stop register-defaults train-decoder bench-decoder train-sadfad train-sadfad-decoder train-probes \
	recreate-model

mlflow: setup  ## start the MLflow server in the background (sqlite + local artifacts in var/mlflow/), wait for /health
	$(BIN)/python scripts/mlflow_server.py start

mlflow-stop:  ## stop the MLflow server that `make mlflow` started
	$(BIN)/python scripts/mlflow_server.py stop

register-defaults: mlflow  ## register the default FR model and the shipped models (models/; champion if none yet)
	FACEXPLAIN_REGISTRY_URI=$${FACEXPLAIN_REGISTRY_URI:-$$($(BIN)/python scripts/mlflow_server.py uri)} \
		$(BIN)/python -m cli.main registry register-defaults

REGISTRY_URI = $${FACEXPLAIN_REGISTRY_URI:-$$($(BIN)/python scripts/mlflow_server.py uri)}
DECODER_PRESET ?= celeba-cpu

train-decoder: register-defaults  ## train the default decoder on ../shared/data/celeba_subset (DECODER_PRESET=celeba-gpu on a GPU)
	$(BIN)/python -m cli.main train decoder --preset $(DECODER_PRESET) --registry $(REGISTRY_URI) \
		--out var/train/decoder-$(DECODER_PRESET)

SADFAD_PRESET ?= cpu
SADFAD_VARIANT ?= sad+fad

train-sadfad: mlflow  ## interpretable FR net (SAD/FAD) on ../shared/data/celeba_subset, registered as an embedder (SADFAD_PRESET=gpu on a GPU)
	$(BIN)/python -m cli.main train sadfad --preset $(SADFAD_PRESET) --variant $(SADFAD_VARIANT) \
		--registry $(REGISTRY_URI) --out var/train/sadfad-$(SADFAD_PRESET)-$(SADFAD_VARIANT)

train-sadfad-decoder: mlflow  ## a decoder for the SAD/FAD model (the default decoder's recipe; re-embeds a cached CelebA face set)
	$(BIN)/python -m cli.main train decoder --preset $(DECODER_PRESET) \
		--fr-model facexplain-sadfad-celeba@champion --register-as facexplain-dfd-sadfad --perceptual dlib_resnet \
		--chips-from auto --registry $(REGISTRY_URI) --out var/train/decoder-sadfad-$(DECODER_PRESET)

train-probes: mlflow  ## accessory/appearance probes (eyeglasses, smiling, ...) on ../shared/data/celeba_subset, registered as facexplain-probes-faceapi
	$(BIN)/python -m cli.main train probes --registry $(REGISTRY_URI) --out var/train/probes

bench-decoder: register-defaults  ## decoder throughput, loss ablation, recipe quality (~1 h CPU) -> bench/results/decoder-*.json
	FACEXPLAIN_REGISTRY_URI=$(REGISTRY_URI) $(BIN)/python bench/bench_decoder.py throughput
	FACEXPLAIN_REGISTRY_URI=$(REGISTRY_URI) $(BIN)/python bench/bench_decoder.py ablation
	FACEXPLAIN_REGISTRY_URI=$(REGISTRY_URI) $(BIN)/python bench/bench_decoder.py quality

MODEL ?= facexplain-dfd-dlib128

recreate-model: register-defaults  ## re-run a shipped model's recipe (MODEL=name) and compare its figures with its card
	$(BIN)/python scripts/ship_model.py recreate $(MODEL) --registry $(REGISTRY_URI)

# -- TorchServe: an export target and the serving baseline (issue 24; see services/torchserve/) ----------------
.PHONY: setup-torchserve torchserve
TS_STAMP := $(VENV)/.torchserve-installed

setup-torchserve: $(TS_STAMP)  ## TorchServe 0.12 + archiver (requirements-torchserve.lock) into the venv; Java 17 if missing

$(TS_STAMP): requirements-torchserve.lock $(STAMP)
	scripts/setup_system.sh --torchserve
	$(BIN)/pip install -q -r requirements-torchserve.lock -c requirements.lock
	touch $@

torchserve: setup-torchserve register-defaults  ## export the champion FR model and decoder to var/torchserve, serve them on 127.0.0.1 (REST 8080, gRPC 7070)
	FACEXPLAIN_REGISTRY_URI=$(REGISTRY_URI) $(BIN)/python scripts/torchserve.py

# -- Staging (see README "Deploy"): the cluster in KUBECONFIG, or podman containers where there is none -------
.PHONY: staging staging-k8s staging-podman

define STAGING_K8S
$(BIN)/python -m cli.main staging up && $(BIN)/python -m cli.main staging test; rc=$$?; \
	$(BIN)/python -m cli.main staging down; \
	if [ $$rc -ne 0 ]; then echo "make staging: failed (exit $$rc); needs a reachable Kubernetes API server in KUBECONFIG (kind, minikube or a GPU cluster: docs in README \"Deploy\")" >&2; fi; \
	exit $$rc
endef

define STAGING_PODMAN
$(BIN)/python -m cli.main staging check --podman || scripts/build_images.sh cpu mlflow postgres || exit $$?; \
	start=$$(date +%s); \
	$(BIN)/python -m cli.main staging up --podman --timeout 1800 && $(BIN)/python -m cli.main staging test --podman; rc=$$?; \
	$(BIN)/python -m cli.main staging down --podman; \
	echo "make staging (podman): exit $$rc after $$(( $$(date +%s) - start )) s (logs on failure: var/staging-podman/)"; \
	exit $$rc
endef

staging: setup  ## k8s/overlays/staging on the cluster in KUBECONFIG, else as podman containers; tests/e2e against it; remove it
	@if [ -n "$${KUBECONFIG:-}" ] || [ -f "$$HOME/.kube/config" ]; then \
		$(STAGING_K8S); \
	elif command -v podman >/dev/null && podman info >/dev/null 2>&1; then \
		echo "make staging: no KUBECONFIG here and podman runs containers: the overlay as podman containers"; \
		$(STAGING_PODMAN); \
	else \
		echo "make staging: needs a Kubernetes API server in KUBECONFIG (kind, minikube or a GPU cluster: README \"Deploy\") or podman (make setup-podman images)" >&2; \
		exit 2; \
	fi

staging-k8s: setup  ## deploy k8s/overlays/staging to the cluster in KUBECONFIG, run tests/e2e against it, tear it down
	@$(STAGING_K8S)

staging-podman: setup  ## no cluster: the same overlay as podman containers (kube play), tests/e2e against it, removed
	@$(STAGING_PODMAN)

# -- Container images (podman; nothing from an image registry; see k8s/images/ and README "Deploy") -----------
.PHONY: setup-podman images images-cuda

setup-podman:  ## podman, buildah, runc, debootstrap and a containers.conf drop-in for this kind of machine
	scripts/setup_system.sh --podman

images: $(STAMP)  ## Debian base (debootstrap), facexplain/service:<version> (CPU), facexplain/mlflow:<version>, facexplain/postgres:<version>
	@command -v podman >/dev/null || $(MAKE) setup-podman
	scripts/build_images.sh cpu mlflow postgres

images-cuda: $(STAMP)  ## facexplain/service:<version>-cuda: the same image with PyPI's CUDA torch (downloads GBs)
	@command -v podman >/dev/null || $(MAKE) setup-podman
	scripts/build_images.sh cuda
