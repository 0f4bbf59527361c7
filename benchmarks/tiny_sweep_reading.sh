# Variants for benchmarks/tiny_sweep.sh: "reading" documents (caption + questions + answers of one scene in one
# line of the LM corpus) and a longer text foundation, so the LLM learns in-context look-ups from text first.
#   VARIANTS=benchmarks/tiny_sweep_reading.sh LIMIT=400 bash benchmarks/tiny_sweep.sh
R=synthetic.reading_docs=true
S=synthetic.caption_order=shuffled
t() { echo foundations.text.max_steps=$1; }
variant A_R_t400_s1350 $R $(t 400) instruct.max_steps=1350
variant B_R_t400_s4000 $R $(t 400) instruct.max_steps=4000
variant C_R_t1000_s4000 $R $(t 1000) instruct.max_steps=4000
variant D_RS_t400_s1350 $R $S $(t 400) instruct.max_steps=1350
variant E_RS_t400_s4000 $R $S $(t 400) instruct.max_steps=4000
variant F_RS_t1000_s4000 $R $S $(t 1000) instruct.max_steps=4000
variant G_t400_s4000 $(t 400) instruct.max_steps=4000
variant H_R_t1000_s2000 $R $(t 1000) instruct.max_steps=2000
variant I_RS_t1000_s2000 $R $S $(t 1000) instruct.max_steps=2000
variant J_R_t400_s4000_seed1 $R $(t 400) seed=1 instruct.max_steps=4000
variant K_RS_t1000_vis24_s4000 $R $S $(t 1000) foundations.vision.epochs=24 instruct.max_steps=4000
variant L_R_t2000_s4000 $R $(t 2000) instruct.max_steps=4000
variant M_RS_t2000_s2000 $R $S $(t 2000) instruct.max_steps=2000
