#!/bin/bash
# The runs behind README "CLIP-TD and MAD" (2-core x86_64 CPU, torch 2.13.0+cpu, 2026-11-30). Each wrote
# OUTPUT/task_distill.json; the copies here are task_distill.json, text_only.json and ablation/NAME.json.
set -e
# The benchmark (18:06-18:42 UTC, three processes at the same time, then merged):
python benchmarks/task_distill.py --tasks vqa --output runs/bench/td_idle/vqa &
python benchmarks/task_distill.py --tasks entailment --output runs/bench/td_idle/entailment &
python benchmarks/task_distill.py --tasks multiple_choice --output runs/bench/td_idle/multiple_choice &
wait
python benchmarks/task_distill.py --merge runs/bench/td_idle/vqa runs/bench/td_idle/entailment \
    runs/bench/td_idle/multiple_choice --output runs/bench
# The line the texts alone reach (seconds):
python benchmarks/task_distill.py --text-only
# What changes the VQA result (21:47-22:14 UTC, the two groups at the same time):
B="--tasks vqa --regimes low_shot_1 low_shot_10 --methods no_kd clip_td"
(python benchmarks/task_distill.py $B --clip-td '{"parts": ["visual"]}' --output runs/bench/td_ablation/visual_only
 python benchmarks/task_distill.py $B --clip-td '{"parts": ["text"]}' --output runs/bench/td_ablation/text_only
 python benchmarks/task_distill.py $B --clip-td '{"weight": 0.1}' --output runs/bench/td_ablation/weight_0.1) &
(python benchmarks/task_distill.py --tasks vqa --regimes low_shot_1 --methods no_kd clip_td --steps 1000 \
    --output runs/bench/td_ablation/steps_1000
 python benchmarks/task_distill.py --tasks vqa --regimes low_shot_1 --methods no_kd mad --adapt-steps 200 \
    --output runs/bench/td_ablation/adapt_200) &
wait
# The visual term alone at 1,000 steps (22:48-23:07 UTC, the two at the same time):
python benchmarks/task_distill.py --tasks vqa --methods no_kd clip_td --steps 1000 --clip-td '{"parts": ["visual"]}' \
    --regimes low_shot_1 --output runs/bench/td_ablation/steps_1000_visual_1 &
python benchmarks/task_distill.py --tasks vqa --methods no_kd clip_td --steps 1000 --clip-td '{"parts": ["visual"]}' \
    --regimes low_shot_10 --output runs/bench/td_ablation/steps_1000_visual_10 &
wait
# The same on entailment at 1% (23:20-23:35 UTC):
python benchmarks/task_distill.py --tasks entailment --methods no_kd clip_td --steps 1000 \
    --clip-td '{"parts": ["visual"]}' --regimes low_shot_1 --output runs/bench/td_ablation/ve_steps_1000_visual_1
# The replication planned in replication.md (2026-11-30 23:58 - 2026-12-01 00:17 UTC, the two at the same time):
python benchmarks/task_distill.py --tasks vqa --regimes low_shot_1 --methods no_kd clip_td --steps 1000 \
    --clip-td '{"parts": ["visual"]}' --first-seed 3 --eval-offset 300 --output runs/bench/td_replication/vqa_1 &
python benchmarks/task_distill.py --tasks multiple_choice --regimes low_shot_1 --methods no_kd clip_td \
    --steps 1000 --clip-td '{"parts": ["visual"]}' --output runs/bench/td_replication/mc_1 &
wait
# The recipe's CLIP-TD and MAD on multiple choice at 1,000 steps (from 00:17 UTC, the two at the same time):
python benchmarks/task_distill.py --tasks multiple_choice --regimes low_shot_1 --steps 1000 \
    --output runs/bench/td_replication/mc_recipe_1 &
python benchmarks/task_distill.py --tasks multiple_choice --regimes low_shot_10 --steps 1000 \
    --output runs/bench/td_replication/mc_recipe_10 &
wait
# MAD on multiple choice at 10%, new seeds and test items, and the full data (from 00:46 UTC, two processes):
python benchmarks/task_distill.py --tasks multiple_choice --regimes low_shot_10 --steps 1000 --first-seed 3 \
    --seeds 2 --eval-offset 300 --output runs/bench/td_replication/mc_recipe_10_s34 &
(python benchmarks/task_distill.py --tasks multiple_choice --regimes low_shot_10 --steps 1000 --first-seed 5 \
    --seeds 1 --eval-offset 300 --output runs/bench/td_replication/mc_recipe_10_s5
 python benchmarks/task_distill.py --tasks multiple_choice --regimes full --steps 1000 --methods no_kd mad \
    --output runs/bench/td_replication/mc_full) &
wait
# (00:46 - 01:14 UTC; outcomes of every run above in replication.md)
# MAD with 200 adaptation steps on multiple choice at 10% (01:24 - 01:38 UTC, two processes; outcome in replication.md):
python benchmarks/task_distill.py --tasks multiple_choice --regimes low_shot_10 --steps 1000 --methods no_kd mad \
    --adapt-steps 200 --seeds 2 --output runs/bench/td_replication/mc_mad200_10_s01 &
python benchmarks/task_distill.py --tasks multiple_choice --regimes low_shot_10 --steps 1000 --methods no_kd mad \
    --adapt-steps 200 --first-seed 2 --seeds 1 --output runs/bench/td_replication/mc_mad200_10_s2 &
wait
