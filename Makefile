# VARGPT experiment suite. `make help` lists the targets; every target sets up .venv first.
SHELL := /bin/bash
.DEFAULT_GOAL := help
PY := .venv/bin/python
# The install stamp is keyed on the content of the requirement files: editing them (or a
# checkout that changes them) reinstalls; otherwise `make setup` returns at once.
REQ_HASH := $(shell cat requirements.txt pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)
STAMP := .venv/.setup-$(REQ_HASH)
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
# OpenMP wait policy. When anything else shares the cores, threads that spin-wait for each other
# slow steps 1.7x (stage 3 beside one busy process) to 10-80x (tiny steps): PASSIVE by default.
# A job that has the cores to itself runs its 2-thread steps faster when they spin (quiet 2-core
# CPU: stage 3, 50 steps 28.5 s PASSIVE, 19.6 s ACTIVE, weights equal to the bit; in full fresh-clone
# runs stage 1 581 -> 504 s, stage 3 1384 -> 1195 s), so the single-job targets (stage1/2/3, the
# pipeline's stage 3 and scoreboard) use SOLO_WAIT.
# An OMP_WAIT_POLICY you set (environment or command line) is used everywhere instead.
ifeq ($(origin OMP_WAIT_POLICY),undefined)
SOLO_WAIT := ACTIVE
else
SOLO_WAIT := $(OMP_WAIT_POLICY)
endif
export OMP_WAIT_POLICY ?= PASSIVE
SOLO := OMP_WAIT_POLICY=$(SOLO_WAIT)
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
ARGS ?=
PYTEST_ARGS ?=

WORLD := runs/data/world
# Samples per task and split of the shape world (80k training images: enough that the longer
# stage-2/3 recipes see each generation target about once).
WORLD_ARGS ?= --train 8000 --val 400 --test 400 --heldout 400 --count train.vqa=24000 --count train.gen=32000 --count train.class=8000
WORLD_STAMP := $(WORLD)/.done-$(shell echo '$(WORLD_ARGS)' | sha256sum | cut -c1-12)
BASES := assets/world/MANIFEST.json
RUN := $(PY) -m experiments.run
# When this make started (parsed once per make process): `make stage1`, `make pipeline` and
# `make test` record their whole wall time, setup and prerequisites included, in runs/timings.json
# (what a newcomer waits; `python -m experiments.report publish scoreboard|timings` copies it beside
# the scoreboard, where the README reads it).
MAKE_START := $(shell date +%s.%N)
STAMP_TIME = $(PY) -m experiments.report stamp

.PHONY: help setup test test-all smoke mlflow-ui clean world-data bases stage1 stage2 stage3 pipeline evaluate sweep compare clean-bases v11-world v11-dpo

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | sort | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv and install the pinned requirements (quick when nothing changed)

$(STAMP): requirements.txt pyproject.toml
	@bash .ci/setup-venv.sh
	@rm -f .venv/.setup-* && touch $@

test: setup ## run the test suite (what CI runs; excludes tests marked slow/gpu)
	$(PY) -m pytest $(PYTEST_ARGS)
	@$(STAMP_TIME) test $(MAKE_START)

test-all: setup ## run every test, including slow ones
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

smoke: setup ## plumbing check: the debug stage for a few seconds, logged to MLflow
	$(PY) -m experiments.run experiments/debug.yaml $(ARGS)

mlflow-ui: setup ## serve the MLflow dashboard for runs/mlflow.db on http://127.0.0.1:$PORT (5000); prints the links to open
	mkdir -p runs/mlartifacts
	@# links that open the runs and their charts, not MLflow 3.17's GenAI overview (experiments.tracking.ui_links)
	-@PORT=$${PORT:-5000} $(PY) -m experiments.tracking links sqlite:///$(CURDIR)/runs/mlflow.db
	$(PY) -m mlflow server --host 127.0.0.1 --port $${PORT:-5000} --workers 1 \
	  --backend-store-uri sqlite:///$(CURDIR)/runs/mlflow.db --default-artifact-root $(CURDIR)/runs/mlartifacts

world-data: setup $(WORLD_STAMP) ## render the shape-world shards into runs/data/world (cached)

$(WORLD_STAMP):
	rm -rf $(WORLD) && $(PY) -m datamodules.world --out $(WORLD) $(WORLD_ARGS) --workers 2
	touch $@

# Stage 0: each base is a file target, so `make bases` reuses what runs/bases/ already has
# (`make clean-bases` to retrain all). Order: text LLM (+ tokenizer), vision tower, VQVAE, BSQ (v1.1),
# class-conditional VAR (needs the VQVAE), reference classifier, then the two LLaVA-1.5 steps.
B := runs/bases
BASE_FILES := $(B)/llm/model.safetensors $(B)/vision/model.safetensors $(B)/vqvae/model.safetensors $(B)/bsq/model.safetensors \
	$(B)/var/model.safetensors $(B)/classifier/model.safetensors $(B)/llava_sft/model.safetensors \
	$(B)/qwen2vl/model.safetensors

bases: setup world-data $(BASE_FILES) ## train the stage-0 world bases missing under runs/bases, then pack them into assets/world/
	$(PY) -m experiments.bases pack
	@$(STAMP_TIME) bases $(MAKE_START)

$(B)/%/model.safetensors: | $(WORLD_STAMP)
	$(RUN) experiments/world/bases/$*.yaml $(ARGS)

$(B)/var/model.safetensors: $(B)/vqvae/model.safetensors | $(WORLD_STAMP)
	$(RUN) experiments/world/bases/var.yaml $(ARGS)

$(B)/llava_align/model.safetensors: $(B)/llm/model.safetensors $(B)/vision/model.safetensors \
		$(B)/vqvae/model.safetensors $(B)/var/model.safetensors | $(WORLD_STAMP)
	$(RUN) experiments/world/llava_align.yaml $(ARGS)

$(B)/llava_sft/model.safetensors: $(B)/llava_align/model.safetensors
	$(RUN) experiments/world/llava_sft.yaml $(ARGS)

# The world's Qwen2-VL (the v1.1 world's start): the LLaVA base's LLM in Qwen2-VL's text model + a ViT
$(B)/qwen2vl/model.safetensors: $(B)/llava_sft/model.safetensors
	$(RUN) experiments/world/bases/qwen2vl.yaml $(ARGS)

clean-bases: ## forget the trained stage-0 bases (runs/bases); `make bases` then retrains all
	rm -rf $(B)

$(BASES):
	$(MAKE) bases

# The world stages. Each export is a file target whose prerequisite is the export it starts from,
# so make's own rule is the one skip rule: a stage reruns when its export is missing or older than
# its input (stage 1 retrained -> stages 2 and 3 rerun). `make stage1/2/3` always run their stage.
# PRESET picks the recipe family: default (experiments/world/*.yaml -> runs/world,
# runs/pipeline/report.json) or a folder of experiments/world/ (v1: VARGPT v1's switches on the same
# bases, steps and protocol -> runs/world-v1, runs/pipeline-v1/report.json).
PRESET ?= default
ifeq ($(PRESET),default)
W := runs/world
WCFG := experiments/world
REPORT_DIR := runs/pipeline
TAG :=
else
W := runs/world-$(PRESET)
WCFG := experiments/world/$(PRESET)
REPORT_DIR := runs/pipeline-$(PRESET)
TAG := -$(PRESET)
ifeq ($(wildcard $(WCFG)/stage1.yaml),)
$(error PRESET=$(PRESET): no $(WCFG)/stage1.yaml; presets: default $(notdir $(patsubst %/stage1.yaml,%,$(wildcard experiments/world/*/stage1.yaml))))
endif
endif
STAGE_ARGS ?=
STAGE2_ARGS ?= $(STAGE_ARGS)
STAGE3_ARGS ?= $(STAGE_ARGS)
UND_ONLY_THEN ?=
STAGE2_ENV ?=

stage1: setup world-data $(BASES) ## VARGPT stage 1 on the embedded CPU world (the main job; PRESET=v1: VARGPT v1's)
	$(SOLO) $(RUN) $(WCFG)/stage1.yaml $(ARGS)
	@$(STAMP_TIME) stage1$(TAG) $(MAKE_START)

stage2: setup world-data $(W)/stage1/model.safetensors ## VARGPT stage 2 from stage 1's export (runs stage 1 first if missing)
	$(SOLO) $(RUN) $(WCFG)/stage2.yaml $(ARGS)

stage3: setup world-data $(W)/stage2/model.safetensors ## VARGPT stage 3 from stage 2's export (runs stages 1-2 first if missing)
	$(SOLO) $(RUN) $(WCFG)/stage3.yaml $(ARGS)

$(W)/stage1/model.safetensors: $(BASES) | $(WORLD_STAMP)
	$(RUN) $(WCFG)/stage1.yaml $(STAGE_ARGS) $(ARGS)

$(W)/stage2/model.safetensors: $(W)/stage1/model.safetensors
	$(STAGE2_ENV) $(RUN) $(WCFG)/stage2.yaml $(STAGE2_ARGS) $(ARGS)

$(W)/stage3/model.safetensors: $(W)/stage2/model.safetensors
	$(RUN) $(WCFG)/stage3.yaml $(STAGE3_ARGS) $(ARGS)

# The understanding-only baseline (from the LLaVA start) depends on no stage; its lines are
# prefixed [und-only]. UND_ONLY_THEN: a command run when it has ended (the pipeline's hand-over).
$(W)/stage2_und_only/model.safetensors: $(BASES) | $(WORLD_STAMP)
	set -o pipefail; $(RUN) $(WCFG)/stage2_und_only.yaml $(STAGE_ARGS) $(ARGS) 2>&1 | sed -u 's/^/[und-only] /'
	$(UND_ONLY_THEN)

# The chain stage 1 -> 2 and the baseline run as two jobs side by side, one thread each (the
# world's small matmuls gain little from a second thread, so together they take about the chain's
# time). Stage 2 is the longer (its generation samples): when the baseline ends it writes 2 into
# stage 2's trainer.threads_file, and stage 2 takes the freed core. Stage 2 runs with SOLO_WAIT:
# one thread has no team to spin for while the two jobs share the cores, and its two threads once
# alone must spin (stage 2, 150 steps handed 2 threads at step 10: 46.1 s spinning, 85.3 s
# passive, 60.7-64.6 s on one thread). When both have ended, stage 3 runs alone on both cores with
# spinning threads (SOLO_WAIT), then the scoreboard reads the four exports.
S2_THREADS := $(W)/.stage2-threads
pipeline: setup world-data $(BASES) ## stages 1-3 + the understanding-only baseline, then the scoreboard (runs/pipeline/report.json; PRESET=v1: runs/pipeline-v1/)
	@$(PY) -m experiments.tracking init  # make runs/mlflow.db now: two runs start together below
	@mkdir -p $(W) && rm -f $(S2_THREADS)
	$(MAKE) --no-print-directory -j2 STAGE_ARGS="trainer.num_threads=1" \
	  STAGE2_ARGS="trainer.num_threads=1 trainer.threads_file=$(S2_THREADS)" UND_ONLY_THEN="echo 2 > $(S2_THREADS)" \
	  STAGE2_ENV="$(SOLO)" \
	  $(W)/stage2/model.safetensors $(W)/stage2_und_only/model.safetensors
	$(SOLO) $(MAKE) --no-print-directory STAGE3_ARGS="trainer.num_threads=2" $(W)/stage3/model.safetensors
	$(SOLO) $(PY) -m experiments.pipeline --runs $(W) --out $(REPORT_DIR)/report.json
	@$(STAMP_TIME) pipeline$(TAG) $(MAKE_START)

# The world VARGPT-v1.1 (docs/v11.md): from the world's Qwen2-VL and BSQ bases, the release's stage 0
# (the generation side on generation data), then its stage 5 (everything but the tokenizer on world
# edits + generation + understanding), then the scoreboard with understanding, generation and
# editing rows (runs/pipeline-v11/report.json). The edit shards are rendered once (cached). The
# sub-make gets SOLO's wait policy (this make exported PASSIVE): stage gen 0.45 s/step passive, 0.31 active.
W11 := runs/world-v11
WEDIT := $(WORLD)/edit
WEDIT_ARGS ?= --tasks edit --train 12000 --val 200 --test 400 --heldout 200
WEDIT_STAMP := $(WEDIT)/.done-$(shell echo '$(WEDIT_ARGS)' | sha256sum | cut -c1-12)
V11_ARGS ?=

$(WEDIT_STAMP): | $(WORLD_STAMP)
	rm -rf $(WEDIT) && $(PY) -m datamodules.world_edit --out $(WEDIT) $(WEDIT_ARGS) --workers 2
	touch $@

$(W11)/gen/model.safetensors: $(BASES) | $(WORLD_STAMP)
	$(SOLO) $(RUN) experiments/world/v11/gen.yaml $(V11_ARGS) $(ARGS)

$(W11)/edit/model.safetensors: $(W11)/gen/model.safetensors | $(WEDIT_STAMP)
	$(SOLO) $(RUN) experiments/world/v11/edit.yaml $(V11_ARGS) $(ARGS)

v11-world: setup world-data $(BASES) $(WEDIT_STAMP) ## VARGPT-v1.1 on the world: its stages 0 and 5 from the world bases, then its scoreboard (runs/pipeline-v11/report.json)
	$(SOLO) $(MAKE) --no-print-directory $(W11)/edit/model.safetensors
	$(SOLO) $(PY) -m experiments.pipeline_v11 --runs $(W11) --out runs/pipeline-v11/report.json --edit-shards "$(WEDIT)/test/edit-*.tar"
	@$(STAMP_TIME) v11-world $(MAKE_START)

# The DPO ablation on the world v1.1 (docs/v11.md): pairs from the final export's own draws on
# training prompts (ranked by the reference classifier), DPO on image bits from that export, then
# one draw per test prompt before and after with the same seeds (runs/pipeline-v11/dpo.json).
V11_DPO_DATA := runs/data/world-v11-dpo
V11_DPO_ARGS ?=
v11-dpo: setup $(W11)/edit/model.safetensors ## the world v1.1 DPO ablation: pairs, DPO, before vs after on the test prompts (runs/pipeline-v11/dpo.json)
	rm -rf $(V11_DPO_DATA) $(W11)/dpo
	$(SOLO) $(PY) -m experiments.dpo_world pairs $(W11)/edit --out $(V11_DPO_DATA) $(V11_DPO_ARGS)
	$(SOLO) $(RUN) experiments/world/v11/dpo.yaml data.root=$(V11_DPO_DATA) $(ARGS)
	$(SOLO) $(PY) -m experiments.dpo_world compare $(W11)/edit $(W11)/dpo --out runs/pipeline-v11/dpo.json \
	  --pairs $(V11_DPO_DATA)/pairs.json --dpo-run $(W11)/dpo
	@$(STAMP_TIME) v11-dpo $(MAKE_START)

evaluate: setup ## evaluate a checkpoint: make evaluate CKPT=runs/world/stage3 [ARGS="eval.cfg=2"]
	$(PY) -m experiments.evaluate $(CKPT) $(ARGS)

sweep: setup ## run an ablation sweep: make sweep SWEEP=experiments/ablations/X.yaml [ARGS="--max-parallel 2"]
	@test -n "$(SWEEP)" || { echo "usage: make sweep SWEEP=experiments/ablations/<file>.yaml [ARGS=\"--dry-run --max-parallel 2 --only NAME\"]"; ls experiments/ablations/*.yaml; exit 2; }
	$(PY) -m experiments.sweep $(SWEEP) $(ARGS)

compare: setup ## table + plots of a sweep or any MLflow experiment: make compare NAME=<sweep or experiment>
	@test -n "$(NAME)" || { echo "usage: make compare NAME=<sweep name, sweep YAML or MLflow experiment> [ARGS=\"--metric val/loss --mode min\"]"; exit 2; }
	$(PY) -m experiments.compare "$(NAME)" $(ARGS)

clean: ## remove run outputs (runs/) but keep .venv
	rm -rf runs/ .pytest_cache

# ---------------------------------------------------------------------------------------------
# The optional evaluation extra: lmms-eval, the field's harness (requirements-eval.txt). Never part
# of `make setup`; `make setup-eval` adds it to .venv. docs/evaluation.md, lmms-eval.
.PHONY: setup-eval test-eval eval-benchmarks
EVAL_STAMP := .venv/.eval-$(shell cat requirements.txt requirements-eval.txt pyproject.toml 2>/dev/null | sha256sum | cut -c1-16)
# The paper's understanding set as lmms-eval tasks (VARGPT, arXiv 2501.12327, Tables 1 and 2).
PAPER_TASKS := mmbench_en_dev,seedbench,mmmu_val,pope,mme,vqav2_val,gqa,textvqa_val,vizwiz_vqa_val,scienceqa_img
TASKS ?= $(PAPER_TASKS)
BENCH_ARGS ?=

setup-eval: setup $(EVAL_STAMP) ## add the optional lmms-eval extra to .venv (requirements-eval.txt) and register vargpt_suite

$(EVAL_STAMP): requirements.txt requirements-eval.txt pyproject.toml
	@bash .ci/setup-eval.sh
	@rm -f .venv/.eval-* && touch $@

test-eval: setup-eval ## the lmms-eval tests (pytest marker lmms_eval): local fixture tasks end to end through the harness
	$(PY) -m pytest -m lmms_eval $(PYTEST_ARGS)

eval-benchmarks: setup-eval ## lmms-eval on a checkpoint + one MLflow run: make eval-benchmarks CKPT=runs/world/stage2 [TASKS=vargpt_world_vqa]
	@test -n "$(CKPT)" || { echo "usage: make eval-benchmarks CKPT=<export dir> [TASKS=$(PAPER_TASKS)] [BENCH_ARGS=\"--limit 50 --batch-size 8\"]"; exit 2; }
	$(PY) -m experiments.eval_benchmarks $(CKPT) --tasks $(TASKS) $(BENCH_ARGS)

# ---------------------------------------------------------------------------------------------
# The GPU check (benchmarks/gpu_check.py). No `setup` prerequisite on
# purpose: a GPU box may run it with its own Python (`make gpu-check PY=python3`).
.PHONY: gpu-check
gpu-check: ## VARGPT-7B on one CUDA device in <= 8 min: step time, MFU, memory, checkpoint, images/s (ARGS="--device cpu": world size)
	$(PY) -m benchmarks.gpu_check $(ARGS)
