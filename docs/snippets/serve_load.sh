# CPU, the trained tiny model: 4 cameras at 0.5 fps in real time for 4 minutes, a question every 5 s
python benchmarks/serve_load.py --model mukv-tiny --streams 4 --minutes 4 --questions 6 --question-rate 0.2 \
    --out runs/serve-cpu-realtime.json
# overload: 8 cameras at 8x speed, frames older than 3 s dropped, a question per second
python benchmarks/serve_load.py --model mukv-tiny --streams 8 --minutes 4 --questions 6 --speed 8 --max-lag 3 \
    --question-rate 1 --out runs/serve-cpu-overload.json
# GPU: the 0.5B architecture with random weights (see benchmarks/gpu_serve.sh for the wheels)
python benchmarks/serve_load.py --model llava-onevision-qwen2-0.5b-ov --device cuda --streams 64 --minutes 5 \
    --question-rate 2 --questions 6 --max-new-tokens 8 --out runs/serve-gpu.json
