# batched, every regime (what the end of each training call prints; any checkpoint directory)
python benchmarks/train_tiny.py --eval-only --eval-per-kind 100 --out runs/eval-shipped
# the product path, one Session per clip, on CPU (the table below)
OMP_NUM_THREADS=1 python benchmarks/train_tiny.py --eval-only --eval-per-kind 3 --eval-batch 11 \
    --session mukv,full_context --device cpu --out runs/eval-session
