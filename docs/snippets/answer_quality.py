"""Answer quality of two policies on the same generated stream."""

import mukv
from mukv.bench import Benchmark, accuracy_report, score

bench = Benchmark.generate(seed=0, minutes=4, questions=3, min_depth_s=30)
stream = bench.stream
questions = sorted(bench.questions, key=lambda q: q.ask_frame)

model = mukv.Session(model="tiny-llava-ov").model  # load once, share it
results = {}
for policy in ("mukv", "rekv"):
    session = mukv.Session(model=model, policy=policy)
    rows, fed = [], 0
    for q in questions:
        # feed up to the moment the question is asked: it only sees the past
        session.feed(stream.frames(fed, q.ask_frame + 1))
        fed = q.ask_frame + 1
        answer = session.ask(q.text, max_new_tokens=4)
        # was the questioned scene retrieved? (whatever the model answered)
        found = any(
            b.frame_start < q.evidence_end and b.frame_end > q.evidence_start
            for b in answer.blocks
        )
        rows.append({
            "kind": q.kind, "level": q.level, "depth_s": q.depth_s,
            "correct": score(answer.text, q.answer),
            "found": found, "kv_tokens": answer.kv_tokens,
        })
    session.close()
    results[policy] = rows

for policy, rows in results.items():
    report = accuracy_report(rows)
    found = sum(r["found"] for r in rows) / len(rows)
    kv = sum(r["kv_tokens"] for r in rows) / len(rows)
    by_level = {k: round(v["accuracy"], 2) for k, v in report["by_level"].items()}
    print(f"{policy:<5} accuracy {report['overall']:.2f}  evidence retrieved "
          f"{found:.2f}  KV tokens {kv:,.0f}  by level {by_level}")
