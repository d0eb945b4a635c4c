# A store with a minute of generated stream.
mukv ingest questions.mukv --synthetic 1 --no-progress
# Keep this question and its answer in the store's question log.
mukv ask questions.mukv "what color was the circle?" --log-questions
# Another retriever for one question (only retrieval, assembly, generation and top-k may change).
mukv ask questions.mukv "what shape was it?" --log-questions --config '{"retrieval": {"retriever": "cosine"}}'
# Read the log: the newest 3 records; -n 0 for all, --json for tools, --query to search.
mukv logs questions.mukv
mukv logs questions.mukv --query shape --json
