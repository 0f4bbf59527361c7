# Variants for benchmarks/tiny_sweep.sh aimed at the reverse (content-keyed) look-ups of issue 3:
# shuffled caption order, training the vision tower in instruct, longer pretraining, more steps.
#   VARIANTS=benchmarks/tiny_sweep_reverse.sh LIMIT=480 bash benchmarks/tiny_sweep.sh
S=synthetic.caption_order=shuffled
TV=instruct.train_vision=true
variant A_s1350 instruct.max_steps=1350
variant B_shuf_s1350 $S instruct.max_steps=1350
variant C_tv_s1350 $TV instruct.max_steps=1350
variant D_shuf_tv_s1350 $S $TV instruct.max_steps=1350
variant E_shuf_tv_s2000 $S $TV instruct.max_steps=2000
variant F_shuf_tv_vis24_s1350 $S $TV foundations.vision.epochs=24 instruct.max_steps=1350
variant G_shuf_tv_ptllm3_s1350 $S $TV pretrain.train_llm=true pretrain.epochs=3 instruct.max_steps=1350
variant H_shuf_s4000 $S instruct.max_steps=4000
variant I_shuf_tv_s4000 $S $TV instruct.max_steps=4000
variant J_shuf_tv_s1350_seed1 $S $TV seed=1 instruct.max_steps=1350
variant K_tv_s4000 $TV instruct.max_steps=4000
variant L_shuf_tv_pt5_s1350 $S $TV pretrain.epochs=5 instruct.max_steps=1350
variant M_shuf_tv_s450 $S $TV
