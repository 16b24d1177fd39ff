#!/bin/bash
# The runs behind README "A teacher that knows the task" (2-core x86_64 CPU, torch 2.13.0+cpu, 2026-12-01 UTC).
# Plans and predictions, each committed before its runs: informed_teacher.md. Copies of the JSONs: informed/.
set -e
REF=runs/teachers/reference-8d3c1bd6e095/model
# The informed VQA teacher: the reference one adapted on all 38,575 training questions (02:09-02:20, 669 s)
vldistill fit mad-vqa --teacher $REF --data.split.low_shot null --adapt.steps 1200 --adapt.batch_size 64 \
    --adapt.lr 2e-4 --adapt.warmup_steps 50 --stages.0.steps 1 --data.limit_eval 300 --output runs/informed/t1200
T=runs/informed/t1200/adapted-teacher
for r in low_shot_1 low_shot_10; do  # 02:20-02:27, the two at the same time
    python benchmarks/task_distill.py --teacher $T --tasks vqa --methods no_kd clip_td --regimes $r \
        --output runs/bench/informed/s150_$r &
done; wait
for r in low_shot_1 low_shot_10; do  # 02:28-02:45
    python benchmarks/task_distill.py --teacher $T --tasks vqa --methods no_kd clip_td --regimes $r --steps 1000 \
        --output runs/bench/informed/s1000_$r &
done; wait
# The informed multiple-choice teacher: adapted on all 4,000 training items (02:47-02:58, 640 s)
vldistill fit cliptd-mc --teacher $REF --data.split.low_shot null \
    --adapt '{steps: 1200, batch_size: 64, lr: 2.0e-4, warmup_steps: 50}' --stages.0.steps 1 \
    --data.limit_eval 300 --output runs/informed/mc1200
T=runs/informed/mc1200/adapted-teacher
for r in low_shot_1 low_shot_10; do  # 02:59-03:15
    python benchmarks/task_distill.py --teacher $T --tasks multiple_choice --methods no_kd clip_td --regimes $r \
        --steps 1000 --output runs/bench/informed/mc1000_$r &
done; wait
# The lead at 10% on new seeds and test items (03:21-03:31)
B="--teacher $T --tasks multiple_choice --methods no_kd clip_td --regimes low_shot_10 --steps 1000 --eval-offset 300"
python benchmarks/task_distill.py $B --first-seed 3 --seeds 2 --output runs/bench/informed/mc1000_10_s34 &
python benchmarks/task_distill.py $B --first-seed 5 --seeds 1 --output runs/bench/informed/mc1000_10_s5 &
wait
# Per-seed Q->A of the runs made before the benchmark wrote it (mc_q2a_per_seed.json, mad_q2a_seeds_3_5.json): each
# saved student (OUTPUT/task_distill/multiple_choice/REGIME/METHOD/seedN/student) loaded with
# vldistill.students.load_student and scored by vldistill.tasks.get_task("multiple_choice").evaluate on the same
# test items; the Q->AR it gives equals the run's JSON for every student.
# clip_td above_chance on multiple choice, the reference teacher (03:52-04:09, the two at the same time)
for r in 1 10; do
    python benchmarks/task_distill.py --tasks multiple_choice --regimes low_shot_$r --methods no_kd clip_td \
        --steps 1000 --clip-td '{"above_chance": true}' --output runs/bench/td_chance/mc_$r &
done; wait
# CLIP-TD's confidence w on multiple choice (03:45; README "A teacher that knows the task"):
python benchmarks/results/task-distill-2026-12-01/confidence.py
# How many text tokens a VQA question has in the benchmark's tokenizer (README: top-8 is every one for 59%): lengths
# with [BOS] 7 / 8 / 9 / 10 / 11 / 12 for 4,169 / 12,692 / 6,064 / 7,025 / 6,062 / 2,563 of the 38,575 questions
python - <<'PY'
from collections import Counter
from vldistill.data.sources import LabelledData, load_task_data
from vldistill.tokenization import train_wordpiece
from vldistill.train.fit import tokenizer_corpus
data = load_task_data("bundled:easyvqa-vqa", "vqa", split="train", limit=None)
tokenizer = train_wordpiece(tokenizer_corpus(LabelledData(data), []), vocab_size=1000)  # as TaskData does
lengths = Counter(len(ids) for ids in tokenizer([s.question for s in data.samples])["input_ids"])
print(sorted(lengths.items()), sum(n for k, n in lengths.items() if k <= 9) / sum(lengths.values()))
PY
