# Variants for benchmarks/tiny_sweep.sh: the question before the image (template vicuna_short_qfirst), so
# visual tokens can attend to the asked object (issue 3's reverse look-ups; docs/training.md).
#   VARIANTS=benchmarks/tiny_sweep_qfirst.sh LIMIT=420 bash benchmarks/tiny_sweep.sh
Q=model_overrides.template=vicuna_short_qfirst
variant A_base_s1350 instruct.max_steps=1350
variant B_q_s450 $Q
variant C_q_s900 $Q instruct.max_steps=900
variant D_q_s1350 $Q instruct.max_steps=1350
variant E_q_s2000 $Q instruct.max_steps=2000
variant F_q_s4000 $Q instruct.max_steps=4000
variant G_q_s1350_seed1 $Q seed=1 instruct.max_steps=1350
variant H_q_s1350_vis24 $Q foundations.vision.epochs=24 instruct.max_steps=1350
variant I_q_s1350_yn3 $Q synthetic.yes_no_lookups=3 instruct.max_steps=1350
variant J_q_s1350_lr2e3 $Q instruct.lr=2.0e-3 instruct.max_steps=1350
variant K_q_s900_b64 $Q instruct.global_batch=64 instruct.micro_batch=64 instruct.max_steps=900
variant L_q_s1350_dpo $Q 'stages=[foundations,pretrain,instruct,dpo]' dpo.precision=fp32 instruct.max_steps=1350
