# The paper's 1b run: ~2.36M-token steps (1,152 sequences of 2,048 tokens), 42k steps,
# warmup-stable-decay with 2k warmup and 2k decay, peak LR 5e-4, 40% masking. Written for 8 GPUs;
# on fewer, the same total_batch_size is reached with more gradient accumulation. The micro-batch
# is not yet measured on a GPU: bench.py's memory model puts it at ~60 GB of an 80 GB GPU, and the
# largest within 90% of it at 8 (`python bench.py --memory=true`, docs/speed.md).
#   torchrun --nproc_per_node=8 train.py config/1b.py --objective=clm --switch_to=mlm \
#       --switch_at=0.25 --out_dir=out/1b/clm25-mlm
# Every run of the paper with this preset: docs/experiment.md. Continued pretraining: config/cpt.py.
model = "1b"
block_size = 2048
batch_size = 6  # sequences per GPU per micro-batch
total_batch_size = 1152  # sequences per optimizer step, all GPUs together
max_steps = 42_000
warmup_steps = 2_000
decay_steps = 2_000
lr = 5e-4
mask_ratio = 0.4
# The data: English FineWeb-Edu, every block read once (the paper's control). A step reads
# 1,152 x 2,048 = 2,359,296 tokens: a 42k run 99.1B, and the longest continued pretraining
# (+22k steps) takes its source's stream to 64k steps, 151.0B. 165B tokens, 5% of the documents
# held out for validation, leave ~157B for training. sample-350BT (~350B GPT-2 tokens) holds them;
# sample-100BT does not. As uint32 token files (cl100k has more than 65,536 ids): ~660 GB.
data = "fineweb-edu:sample-350BT"
data_tokens = 165_000_000_000
tokenizer = "cl100k"  # Llama-3's 128k vocabulary is cl100k plus 28k tokens: docs/experiment.md
eval_interval = 1_000
eval_batches = 20
out_dir = "out/1b"
