"""The question log: opt-in, one record per answer in the store, through a reopen, by readers
that never take the writer lock, on a local disk and on S3; read with QuestionLog and `mukv logs`."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mukv
from mukv.cli import main
from mukv.errors import ConfigError
from mukv.logs import QuestionLog
from mukv.session import Session
from mukv.specs import config_hash
from test_disk_s3 import s3  # noqa: F401  (the moto S3 server fixture)


def _frames(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (n, 64, 64, 3), dtype=np.uint8)


def test_off_by_default(tmp_path, tiny_model):
    with Session(model=tiny_model, backend="lancedb", path=tmp_path / "s") as s:
        s.feed(_frames(4))
        s.ask("what color?", max_new_tokens=1)
    assert not (tmp_path / "s" / "logs").exists()
    assert QuestionLog(str(tmp_path / "s")).records() == []


def test_records_survive_a_reopen_and_hold_what_was_asked(tmp_path, tiny_model):
    path = tmp_path / "s"
    with Session(model=tiny_model, backend="lancedb", path=path, log_questions=True) as s:
        s.feed(_frames(8))
        a1 = s.ask("what color was the circle?", max_new_tokens=2)
        first_hash = config_hash(s.config)
    with Session.open(path, model=tiny_model, log_questions=True) as s:
        fork = s.fork(config={"retrieval": {"retriever": "cosine"}})
        a2 = fork.ask("how many squares?", max_new_tokens=2)
        second_hash = config_hash(fork.config)
    log = QuestionLog(str(path))
    recs = log.records()
    assert [r["question"] for r in recs] == ["what color was the circle?", "how many squares?"]
    assert [r["answer"] for r in recs] == [a1.text, a2.text]
    r = recs[0]
    assert r["stream_id"] == "default" and r["model"] == tiny_model.name and r["kv_tokens"] == a1.kv_tokens
    assert [(b["level"], b["block_id"], b["score"]) for b in r["blocks"]] == \
        [(b.level, b.block_id, b.score) for b in a1.blocks]
    assert set(r["timings"]) >= {"query", "retrieve", "page_in", "total"} and r["time"].endswith("Z")
    assert r["stream_time"] == pytest.approx(14.0)  # 8 frames at 0.5 fps
    # one configuration per hash, kept once; the fork's other retriever has another hash
    assert first_hash != second_hash and [x["config_hash"] for x in recs] == [first_hash, second_hash]
    assert log.config(second_hash)["retrieval"]["retriever"] == "cosine"
    # filters
    assert [x["question"] for x in log.records(count=1)] == ["how many squares?"]
    assert [x["question"] for x in log.records(query="CIRCLE")] == ["what color was the circle?"]
    assert [x["question"] for x in log.records(config_hash=second_hash[:6])] == ["how many squares?"]
    assert log.records(model="other") == []


def test_a_reader_logs_without_the_writer_lock(tmp_path, tiny_model):
    path = tmp_path / "s"
    writer = Session(model=tiny_model, backend="lancedb", path=path)
    try:
        writer.feed(_frames(8))
        writer.backend.flush()
        with pytest.raises(mukv.StoreError, match="pid"):  # another writer holds the stream
            Session.open(path, model=tiny_model)
        reader = Session.open(path, model=tiny_model, log_questions=True, read_only=True)
        with reader:
            assert reader.backend.read_only
            reader.ask("what color?", max_new_tokens=1)
        writer.feed(_frames(4, seed=1))  # the writer is unaffected
    finally:
        writer.close()
    assert [r["question"] for r in QuestionLog(str(path)).records()] == ["what color?"]


def test_logs_command(tmp_path, tiny_model, capsys):
    path = tmp_path / "s"
    with Session(model=tiny_model, backend="lancedb", path=path, log_questions=True) as s:
        s.feed(_frames(8))
        for q in ("one?", "two?", "three?", "four?"):
            s.ask(q, max_new_tokens=1)
    assert main(["logs", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Q: two?" in out and "Q: four?" in out and "Q: one?" not in out  # the newest 3, newest last
    assert out.index("Q: two?") < out.index("Q: four?") and "retrieved:" in out and "timings:" in out
    assert main(["logs", str(path), "-n", "0", "--json"]) == 0
    recs = json.loads(capsys.readouterr().out)
    assert [r["question"] for r in recs] == ["one?", "two?", "three?", "four?"]
    assert main(["logs", str(path), "--query", "thr", "--json", "--show-config"]) == 0
    (rec,) = json.loads(capsys.readouterr().out)
    assert rec["question"] == "three?" and rec["config"]["levels"][0]["name"] == "patch"
    assert main(["logs", str(path), "--since", "2000-01-01", "--until", "2999-01-01", "-n", "0", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4
    assert main(["logs", str(path), "--since", "2999-01-01"]) == 0
    assert "no records match" in capsys.readouterr().out
    assert main(["logs", str(path), "--since", "yesterday"]) == 2
    assert "--since" in capsys.readouterr().err
    assert main(["logs", str(tmp_path / "missing")]) == 2
    assert "no such store" in capsys.readouterr().err


def test_ask_and_chat_log_with_the_flag_only(tmp_path, tiny_model, capsys, monkeypatch):
    path = tmp_path / "s"
    with Session(model="tiny-llava-ov", backend="lancedb", path=path) as s:
        s.feed(_frames(8))
    assert main(["ask", str(path), "not logged?", "--max-new-tokens", "1"]) == 0
    assert main(["ask", str(path), "logged?", "--max-new-tokens", "1", "--log-questions"]) == 0
    monkeypatch.setenv("MUKV_QUESTION_LOG", "true")  # the user's setting turns it on for every command
    assert main(["ask", str(path), "by env?", "--max-new-tokens", "1"]) == 0
    capsys.readouterr()
    assert [r["question"] for r in QuestionLog(str(path)).records()] == ["logged?", "by env?"]


def test_a_log_that_cannot_be_written_keeps_the_answer(tmp_path, tiny_model, caplog):
    path = tmp_path / "s"
    with Session(model=tiny_model, backend="lancedb", path=path, log_questions=True) as s:
        s.feed(_frames(4))
        (path / "logs").mkdir(exist_ok=True)
        (path / "logs" / "default").write_text("a file where the log folder should be")
        answer = s.ask("what?", max_new_tokens=1)
    assert answer.text is not None and any("question log" in n for n in answer.notes)
    assert "question log" in caplog.text


def test_bad_log_targets_are_config_errors(tiny_model):
    with pytest.raises(ConfigError, match="needs|no path"):
        Session(model=tiny_model, log_questions=True)
    with pytest.raises(ConfigError, match="log_questions"):
        Session(model=tiny_model, log_questions=3)


def test_a_memory_session_can_log_into_a_folder(tmp_path, tiny_model):
    with Session(model=tiny_model, log_questions=str(tmp_path / "qlog")) as s:
        s.feed(_frames(4))
        s.ask("where?", max_new_tokens=1)
    assert [r["question"] for r in QuestionLog(str(tmp_path / "qlog")).records()] == ["where?"]


def test_on_s3_through_a_reopen(s3, tiny_model, capsys):  # noqa: F811
    uri = "s3://mukv/qlog-store"
    opts = {"storage_options": s3}
    with Session(model=tiny_model, backend="lancedb", path=uri, backend_options=opts, log_questions=True) as s:
        s.feed(_frames(8))
        s.ask("first on s3?", max_new_tokens=1)
    with Session.open(uri, model=tiny_model, backend_options=opts, log_questions=True) as s:
        s.ask("second on s3?", max_new_tokens=1)
    recs = QuestionLog(uri, storage_options=s3).records()
    assert [r["question"] for r in recs] == ["first on s3?", "second on s3?"]
    assert main(["logs", uri, "--backend-options", json.dumps(opts), "--json"]) == 0
    assert [r["question"] for r in json.loads(capsys.readouterr().out)] == ["first on s3?", "second on s3?"]


@pytest.mark.parametrize("text", ["1e400", "inf", "-inf", "nan", "garbage", "2026-13-40"])
def test_log_time_filters_refuse_what_is_no_time(text):
    # "1e400" (and "nan") once passed as float('inf') / nan and filtered everything or nothing
    from mukv.logs import parse_time

    with pytest.raises(mukv.InputError, match="--since"):
        parse_time(text, "--since")
    assert parse_time("1796690000", "--since") == 1796690000.0
    assert parse_time("2026-12-06T14:03:00Z", "--since") == 1796565780.0


BAD_RECORDS = {
    # each once an internal error (ValueError / TypeError) in `mukv logs`, or shown as an empty record
    "stream_time as text": lambda r: r.__setitem__("stream_time", "x"),
    "score as text": lambda r: r["blocks"][0].__setitem__("score", "x"),
    "timing as text": lambda r: r.__setitem__("timings", {"total": "x"}),
    "notes a number": lambda r: r.__setitem__("notes", 5),
    "blocks a number": lambda r: r.__setitem__("blocks", 5),
    "unix_time a boolean": lambda r: r.__setitem__("unix_time", True),
    "no question": lambda r: r.pop("question"),
    "an empty object": lambda r: r.clear(),
}


@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_a_malformed_record_is_skipped_with_a_warning(tmp_path, tiny_model, capsys, caplog, case):
    from mukv.logs import check_record, format_record

    path = tmp_path / "s"
    with Session(model=tiny_model, backend="lancedb", path=path, log_questions=True) as s:
        s.feed(_frames(4))
        s.ask("first?", max_new_tokens=1)
        s.ask("second?", max_new_tokens=1)
    qlog = QuestionLog(str(path))
    first = path / "logs" / "default" / f"{qlog.ids()[0]}.json"
    rec = json.loads(first.read_text())
    assert rec["blocks"], rec
    check_record(rec)  # what the log writes is a record
    BAD_RECORDS[case](rec)
    first.write_text(json.dumps(rec))
    with pytest.raises(mukv.InputError, match="question-log record"):
        format_record(rec)
    assert [r["question"] for r in qlog.records()] == ["second?"]
    assert "skipping" in caplog.text
    capsys.readouterr()
    assert main(["logs", str(path)]) == 0
    out = capsys.readouterr()
    assert "second?" in out.out and "first?" not in out.out and "internal error" not in out.err
