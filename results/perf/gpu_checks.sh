#!/bin/bash
# Device checks for issue 4, one prepared script (run from the repository root on a CUDA machine whose
# python3 has torch and timm): CUDA tests, then the benchmark at batch 64, 224 px, records into $OUT.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PY=python3
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
$PY -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
timeout 90 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -4
B="$PY -m pretrain.bench --input-size 224 --batch-size 64 --device cuda --steps 10 --warmup 3 --repeats 1"
timeout 100 $B --model resnet50 --modes sparse,gather,zero --amp bf16 --channels-last --save $OUT/resnet50-bf16cl.json
timeout 100 $B --model resnet50 --modes sparse,gather,zero --save $OUT/resnet50-fp32.json
[ "${SKIP_CONVNEXT:-0}" = 1 ] || {
timeout 70 $B --model convnext_small --modes sparse,zero --save $OUT/convnext_small-fp32.json
timeout 70 $B --model convnext_small --modes sparse,zero --amp bf16 --channels-last --save $OUT/convnext_small-bf16cl.json
}
timeout 170 $B --model resnet50 --modes sparse,zero --amp bf16 --channels-last --compile --steps 8 --save $OUT/resnet50-bf16cl-compile.json
echo done
