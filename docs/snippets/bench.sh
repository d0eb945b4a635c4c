# Policies side by side on generated streams, at the same KV budget per answer;
# tables and a plot in results/ (add lengths: --minutes 1 10 60).
mukv bench --model tiny-llava-ov --minutes 2 --questions 3 --policies mukv rekv \
    --out results
