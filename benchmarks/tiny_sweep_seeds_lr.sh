# Session-6 sweep 2 (after seeding the initial weights): the shipped tiny recipe over six seeds, against the
# same at twice the instruct learning rate.
#   VARIANTS=benchmarks/tiny_sweep_seeds_lr.sh LIMIT=380 bash benchmarks/tiny_sweep.sh
for s in 0 1 2 3 4 5; do variant E_shipped_seed$s seed=$s; done
for s in 0 1 2 3 4 5; do variant F_lr2e-3_seed$s seed=$s instruct.lr=2e-3; done
