# A week of video at 0.5 fps is 302,400 frames. Try MINUTES=60 first.
MINUTES=${MINUTES:-10080}

# Ingest into a store on disk with a 64 MiB hot tier; run it again to extend it.
mukv ingest week.mukv --synthetic "$MINUTES" \
    --backend-options '{"hot_bytes": 67108864}'

# What the store holds per level and tier; memory over stream time as a picture.
mukv inspect week.mukv --plot memory.png

# Reopen and ask (in a new process, any time later).
mukv ask week.mukv "what color was the triangle?" --plot timeline.png
