#!/bin/bash
# The CUDA path end to end, on a machine with a GPU where onnxprune is installed:
#   benchmarks/gpu_check.sh [OUT_DIR]
# 1. the demo (WoodFisher at 80%, 300 fine-tuning steps) with --device cuda and --device cpu:
#    reports in OUT_DIR/demo_{cuda,cpu}.json, wall times printed;
# 2. a gradual run under torchrun with one NCCL rank (OUT_DIR/torchrun.json);
# 3. the default test suite, where --device auto picks the GPU (OUT_DIR/pytest.txt).
set -u
out=${1:-build/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
bin=$(dirname "$(python3 -c 'import sys; print(sys.executable)')")
seconds() { python3 -c "import sys; print(round(float(sys.argv[2]) - float(sys.argv[1]), 1))" "$@"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
demo="models/mnist_cnn.onnx --sparsity 0.8 --calib models/mnist_calib.npz --eval models/mnist_eval.npz"
for device in cuda cpu; do
  start=$(date +%s.%N)
  "$bin/onnxprune" $demo "$out/demo_$device.onnx" --finetune-steps 300 --device "$device" --force --json \
    >"$out/demo_$device.json" 2>"$out/demo_$device.log"
  echo "demo --device $device: exit $?, $(seconds "$start" "$(date +%s.%N)") s"
done
start=$(date +%s.%N)
"$bin/torchrun" --standalone --nproc-per-node 1 "$bin/onnxprune" $demo "$out/torchrun.onnx" --schedule gradual \
  --prune-steps 3 --finetune-steps 150 --force --json >"$out/torchrun.json" 2>"$out/torchrun.log"
echo "torchrun, 1 NCCL rank, gradual: exit $?, $(seconds "$start" "$(date +%s.%N)") s"
python3 -m pytest -q -rf -p no:cacheprovider ${PYTEST_ARGS:-} >"$out/pytest.txt" 2>&1
echo "tests: exit $?"
grep -E "^FAILED|passed|failed" "$out/pytest.txt" | tail -30
