#!/bin/bash
# Device checks for issue 4, one prepared script (run from the repository root on a CUDA machine whose
# python3 has torch and timm): CUDA tests, then the benchmark at batch 64, 224 px (ResNet-50 and the
# models in $MODELS, default convnext_small; MODELS=none for ResNet-50 only); records and log in $OUT.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PY=python3
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
exec > >(tee "$OUT/gpu_checks.log") 2>&1
nvidia-smi --query-gpu=name --format=csv,noheader
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -30
B="$PY -m pretrain.bench --input-size 224 --batch-size 64 --device cuda --steps 10 --warmup 3 --repeats 1"
models=${MODELS:-convnext_small}; [ "$models" = none ] && models=
for model in resnet50 $models; do
  timeout 100 $B --model $model --modes sparse,zero --amp bf16 --channels-last --save "$OUT/$model-bf16cl.json"
  timeout 100 $B --model $model --modes sparse,zero --amp none --channels-last off --save "$OUT/$model-fp32.json"
done
echo done
