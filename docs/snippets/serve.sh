# a store in a folder, the trained tiny model, the page at http://127.0.0.1:8000/
mukv serve cams.mukv
# on every interface of the machine: a bearer token is required
MUKV_SERVE_TOKEN=change-me-to-a-long-secret mukv serve cams.mukv --host 0.0.0.0 --port 8000
# frames that wait longer than 5 s are dropped (and recorded as gaps); no thumbnails
mukv serve cams.mukv --max-lag 5 --thumbnails 0 --model llava-onevision-qwen2-0.5b-ov --device cuda
