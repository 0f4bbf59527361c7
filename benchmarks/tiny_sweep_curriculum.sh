# Session-6 sweep: how reliably does the shipped tiny recipe (captions mixed into instruct) learn the late
# look-ups, against a questions-first curriculum and questions-only instruct data, over several seeds.
#   VARIANTS=benchmarks/tiny_sweep_curriculum.sh LIMIT=530 bash benchmarks/tiny_sweep.sh
CUR="instruct.curriculum_steps=2500 instruct.curriculum_data=[eval_questions.json]"
QO='instruct.data=[eval_questions.json]'
for s in 0 1 2; do variant A_shipped_seed$s seed=$s; done
for s in 0 1 2 3 4; do variant B_cur2500_seed$s seed=$s $CUR; done
for s in 0 1 2 3; do variant D_qonly_seed$s seed=$s "$QO" instruct.group_by_length=false; done
