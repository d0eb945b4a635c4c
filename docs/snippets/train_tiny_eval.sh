# every regime batched, then the product path (one mukv.Session per clip) for two policies, on CPU
python benchmarks/train_tiny.py --eval-only --eval-per-kind 100 --session mukv,full_context --device cpu \
    --out runs/eval-shipped
