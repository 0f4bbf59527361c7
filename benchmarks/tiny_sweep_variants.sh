variant A_base
variant B_s1350 instruct.max_steps=1350
variant C_bs16_s1350 instruct.global_batch=16 instruct.micro_batch=16 instruct.max_steps=1350
variant D_bs16_s2700 instruct.global_batch=16 instruct.micro_batch=16 instruct.max_steps=2700
variant E_p8 model_overrides.vision.patch_size=8
variant F_p8_bs16_s1350 model_overrides.vision.patch_size=8 instruct.global_batch=16 instruct.micro_batch=16 instruct.max_steps=1350
variant G_vis24_bs16_s1350 foundations.vision.epochs=24 instruct.global_batch=16 instruct.micro_batch=16 instruct.max_steps=1350
variant H_d8k_bs16_s1350 synthetic.train_images=8000 instruct.global_batch=16 instruct.micro_batch=16 instruct.max_steps=1350
variant I_s4000 instruct.max_steps=4000
