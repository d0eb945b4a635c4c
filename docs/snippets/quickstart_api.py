import mukv
from mukv import plots
from mukv.bench import Benchmark

# Four minutes of a generated stream (120 frames at 0.5 fps), with two questions.
bench = Benchmark.generate(seed=0, minutes=4, questions=2, min_depth_s=20)
frames = bench.stream.frames(0, bench.stream.num_frames)  # uint8 [120, 64, 64, 3]

session = mukv.Session(model="tiny-llava-ov")  # random weights: answers are noise
session.feed(frames)  # call it again and again for a live stream

question = bench.questions[0]
answer = session.ask(question.text, max_new_tokens=4)
print(question.text)
print("answer:", answer.text, "| truth:", question.answer)
print("blocks per level:", answer.levels())  # {'patch': 20, 'frame': 32, ...}
print("KV tokens at answer time:", answer.kv_tokens)
for block in answer.blocks[:3]:
    first, last = block.frame_start, block.frame_end - 1
    print(f"  {block.level:<8} frames {first}-{last}  score {block.score:.3f}")

print(session.stats()["levels"])  # blocks, tokens and bytes stored per level
asked_at = session.stats()["last_time"]
plots.plot_retrieval_timeline(answer, "timeline.png", duration=asked_at)
session.close()
