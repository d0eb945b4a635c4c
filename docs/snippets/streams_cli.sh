# A store with a stream called cam1 (here a generated minute of video; any video files work)
mukv ingest cams.mukv --synthetic 1 --stream-id cam1 --model tiny-llava-ov --no-progress

# Every stream: frames, time span (wall-clock when known), KV bytes, model, sources
mukv streams list cams.mukv

# A question about one part of the stream only (stream seconds, or ISO times)
mukv ask cams.mukv "what color was the circle?" --stream-id cam1 --since 20 --until 40

# Move the stream to an archive store: export (verified), import (verified), delete
mukv streams export cams.mukv cam1 cam1.export
mukv streams import archive.mukv cam1.export --as cam1-monday
mukv streams delete cams.mukv cam1

# Check the archive end to end, and see what a repair would do (nothing, here)
mukv inspect archive.mukv --verify
mukv repair archive.mukv
