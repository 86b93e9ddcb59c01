#!/usr/bin/env bash
# The ms-swift seed workflow, with `osstune` in place of `swift`. MODEL and DATA point at a local gpt-oss-20b folder
# and a training file (messages / alpaca / sharegpt JSON).
set -euo pipefail
MODEL=${MODEL:-/models/gpt-oss-20b}
DATA=${DATA:-train.json}

NPROC_PER_NODE=4 CUDA_VISIBLE_DEVICES=0,1,2,3 osstune sft --deepspeed zero3 --model "$MODEL" --dataset "$DATA" \
  --train_type lora --torch_dtype bfloat16 --num_train_epochs 35 --per_device_train_batch_size 1 \
  --per_device_eval_batch_size 1 --learning_rate 1e-4 --lora_rank 8 --lora_alpha 32 --target_modules all-linear \
  --gradient_accumulation_steps 16 --eval_steps 50 --save_steps 50 --save_total_limit 2 --logging_steps 5 \
  --max_length 8192 --output_dir output --warmup_ratio 0.05 --dataloader_num_workers 4 --use_liger_kernel true \
  --load_from_cache_file false --loss_scale ignore_empty_think --save_strategy epoch --model_author gxb \
  --model_name gxb-gpt-oss-20b-agent-distill --report_to swanlab --swanlab_project swift-robot
