# Continued pretraining (CPT), the paper's: MLM at 40% on a converged (decayed) 42k model, CLM or
# MLM, for +2k, +12k or +22k steps (610m-clm-dec42k-mlm40-54k is +12k on the decayed CLM model).
# Give it after a size preset, with the source and the budget:
#   torchrun --nproc_per_node=8 train.py config/610m.py config/cpt.py \
#       --init_from=out/610m/clm/ckpt.pt --max_steps=12000 --warmup_steps=120 \
#       --out_dir=out/610m/clm-dec42k-mlm40-54k
# The paper does not state the CPT schedule, and the authors' MLM_vs_CLM training code could not
# be read, so these are choices, made from their main-branch trainer where it says something:
# - AdamW state: carried over from the source (load_optimizer). Their trainer reloads the optimizer
#   whenever it restarts from a checkpoint and has no switch to skip it.
# - Data: the source's stream read on, so CPT sees new blocks (steps 42k-64k of one stream).
# - Learning rate: a new warmup-stable-decay over the CPT budget, peak 5e-4. The source ended its
#   decay at 0, so the rate must rise again: warmup over 1% of the budget (their trainer's default
#   for a fresh schedule, pct_start=0.01; give --warmup_steps=20, 120 or 220), then the paper's
#   2,000-step decay at the end, or, for +2k, the rest of the budget (--decay_steps=1980).
objective = "mlm"
switch_to = "none"
mask_ratio = 0.4
load_optimizer = True
decay_steps = 2_000
