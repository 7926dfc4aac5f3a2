# The paper's 210m run: ~2.36M-token steps (1,152 sequences of 2,048 tokens), 42k steps,
# warmup-stable-decay with 2k warmup and 2k decay, peak LR 5e-4, 40% masking. Written for 8 GPUs; on
# fewer, the same total_batch_size is reached with more gradient accumulation. The micro-batch is a
# starting point, not yet measured on a GPU: bench.py reports what fits (see the README's speed
# section).
#   torchrun --nproc_per_node=8 train.py config/210m.py --objective=clm --switch_to=mlm \
#       --switch_at=0.25 --out_dir=out/210m-clm25-mlm
model = "210m"
block_size = 2048
batch_size = 8  # sequences per GPU per micro-batch
total_batch_size = 1152  # sequences per optimizer step, all GPUs together
max_steps = 42_000
warmup_steps = 2_000
decay_steps = 2_000
lr = 5e-4
mask_ratio = 0.4
data = "fineweb-edu:sample-100BT"  # the paper's English FineWeb-Edu, ~100B unique tokens
data_tokens = 100_000_000_000
tokenizer = "cl100k"  # the paper uses Llama-3's 128k vocabulary, whose base is cl100k
eval_interval = 1_000
eval_batches = 20
out_dir = "out/210m"
