# Second sweep on the question-first template (docs/training.md): single-turn questions only (every
# existence/position question then sees the question before the image), a constant learning rate (a late
# phase transition needs lr), 4 visual tokens, a longer vision foundation.
#   VARIANTS=benchmarks/tiny_sweep_qfirst2.sh LIMIT=400 bash benchmarks/tiny_sweep.sh
Q=model_overrides.template=vicuna_short_qfirst
S='instruct.data=[eval_questions.json]'
C=instruct.min_lr_ratio=1.0
P8=model_overrides.vision.patch_size=8
variant A_q_S_s4000 $Q "$S" instruct.max_steps=4000
variant B_q_S_C_s4000 $Q "$S" $C instruct.max_steps=4000
variant C_q_S_P8_s4000 $Q "$S" $P8 instruct.max_steps=4000
variant D_q_S_C_P8_s4000 $Q "$S" $C $P8 instruct.max_steps=4000
variant E_q_C_s4000 $Q $C instruct.max_steps=4000
variant F_q_C_P8_s4000 $Q $C $P8 instruct.max_steps=4000
variant G_q_S_C_b64_s3000 $Q "$S" $C instruct.global_batch=64 instruct.micro_batch=64 instruct.max_steps=3000
variant H_q_S_C_vis24_s4000 $Q "$S" $C foundations.vision.epochs=24 instruct.max_steps=4000
variant I_q_S_C_P8_vis24_s4000 $Q "$S" $C $P8 foundations.vision.epochs=24 instruct.max_steps=4000
variant J_q_S_C_s4000_seed1 $Q "$S" $C seed=1 instruct.max_steps=4000
variant K_base_S_C_s4000 "$S" $C instruct.max_steps=4000
variant L_q_S_C_P8_s2000 $Q "$S" $C $P8 instruct.max_steps=2000
