# Policies side by side on generated streams, at the same KV budget per answer;
# tables and a plot in results/ (add lengths: --minutes 1 10 60). --oracle adds a
# row that answers each question from its own scene alone (reading vs finding).
mukv bench --model tiny-llava-ov --minutes 2 --questions 3 --policies mukv rekv \
    --oracle --out results
