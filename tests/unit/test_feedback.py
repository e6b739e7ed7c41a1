"""The feedback log's interface and its backends' choice (segments here in a local folder; against a real
S3 server in tests/integration/test_feedback_segments.py)."""

from __future__ import annotations

import threading

import pytest

from adrec.errors import ConfigError
from adrec.feedback import FileLog, SegmentLog, open_log
from adrec.feedback.filelog import FilePosition
from adrec.feedback.segments import SegmentPosition, list_segments


def _rec(eid: str, ts: float = 1.0) -> dict:
    return {"event_id": eid, "user": "u_abc", "item": "i1", "type": "impression", "ts": ts, "context": {}}


def test_open_log_picks_the_backend_from_the_location(tmp_path):
    assert isinstance(open_log(tmp_path / "events.jsonl"), FileLog)
    seg = open_log("s3://bucket/prefix/feedback/")
    assert isinstance(seg, SegmentLog) and seg.uri == "s3://bucket/prefix/feedback"
    assert isinstance(open_log(tmp_path / "segs", kind="segments"), SegmentLog)
    with pytest.raises(ConfigError, match="a file log lives on a local disk"):
        open_log("s3://bucket/events.jsonl", kind="file")
    with pytest.raises(ConfigError, match="unknown kind 'kafka'"):
        open_log(tmp_path / "x", kind="kafka")


def test_a_checkpointed_position_belongs_to_one_kind_of_log(tmp_path):
    file_reader = open_log(tmp_path / "events.jsonl").reader()
    seg_reader = open_log(tmp_path / "segs", kind="segments").reader()
    assert file_reader.position(120) == FilePosition(120) and file_reader.start().state() == 0
    pos = SegmentPosition({"w-b": (3, 2), "w-a": (1, 0)})
    assert pos.state() == {"writers": {"w-a": [1, 0], "w-b": [3, 2]}}
    assert seg_reader.position(pos.state()) == pos
    with pytest.raises(ConfigError, match="not a position in a segment log"):
        seg_reader.position(120)  # a file log's checkpoint, now reading segments
    with pytest.raises(ConfigError, match="not a byte offset"):
        file_reader.position(pos.state())
    with pytest.raises(ConfigError):
        seg_reader.position({"writers": {"w": [1, -1]}})


def test_segments_in_a_local_folder_group_commit_and_read_in_order(tmp_path):
    log = open_log(tmp_path / "segs", kind="segments", group_wait_s=0.05)
    w = log.writer()
    start = threading.Barrier(6)
    results = {}

    def send(i: int) -> None:
        start.wait()
        results[i] = w.append([_rec(f"e{i}-{k}") for k in range(3)] + [_rec("shared")])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(len(r.accepted) for r in results.values()) == 6 * 3 + 1  # "shared" once, duplicates elsewhere
    assert sum(r.duplicates == ["shared"] for r in results.values()) == 5
    segs = list_segments(log.root)
    assert 1 <= len(segs) < 6 and w.segments_written == len(segs)
    (tmp_path / "segs" / w.writer_id / ".000000000009-0000000000000.jsonl.x.tmp").write_text("{}\n")  # half-written
    reader = log.reader()
    res = reader.read(reader.start(), 1000)
    assert sorted(e.event_id for e in res.events) == sorted({f"e{i}-{k}" for i in range(6) for k in range(3)} | {"shared"})
    assert reader.caught_up(res.end) and not reader.caught_up(reader.start())
    assert w.append([_rec("shared")]).duplicates == ["shared"] and len(list_segments(log.root)) == len(segs)
    w.close()
    with pytest.raises(OSError, match="closed"):
        w.append([_rec("late")])


def test_app_args_keep_a_store_uri_as_the_feedback_log(tmp_path):
    from adrec.serving.args import AppArgs

    args = AppArgs(model_dir=str(tmp_path / "model"), pseudonym_key="k", feedback_log="s3://bucket/run/feedback/")
    assert args.resolved().feedback_log == "s3://bucket/run/feedback"
    local = AppArgs(model_dir=str(tmp_path / "model"), pseudonym_key="k", feedback_log="fb/events.jsonl")
    assert local.resolved().feedback_log.endswith("/fb/events.jsonl") and local.resolved().feedback_log.startswith("/")


def test_several_feedback_writers_need_a_log_on_a_shared_store(tmp_path):
    from adrec.serving.args import AppArgs
    from adrec.serving.builder import build_app

    args = AppArgs(model_dir=str(tmp_path / "model"), pseudonym_key="k", feedback_log=str(tmp_path / "fb.jsonl"),
                   feedback_replicas=2)
    with pytest.raises(ConfigError, match="feedback_replicas=2, but the feedback log .* is a local file"):
        build_app(args)


def test_the_ingress_writes_feedback_only_on_a_segment_log_in_the_fused_topology(tmp_path):
    from adrec.serving.args import AppArgs
    from adrec.serving.builder import build_app

    base = dict(model_dir=str(tmp_path / "model"), pseudonym_key="k")
    assert AppArgs(**base, feedback_log="s3://b/run/feedback", feedback_writer="auto").ingress_writes_feedback()  # fused
    assert not AppArgs(**base, feedback_log="s3://b/run/feedback", feedback_writer="auto", topology="graph").ingress_writes_feedback()
    assert not AppArgs(**base, feedback_log=str(tmp_path / "fb.jsonl")).ingress_writes_feedback()  # one writer
    assert not AppArgs(**base, feedback_log="s3://b/f", feedback_writer="deployment").ingress_writes_feedback()
    for bad in ({"feedback_log": str(tmp_path / "fb.jsonl")}, {"feedback_log": "s3://b/f", "topology": "graph"}):
        with pytest.raises(ConfigError, match="feedback_writer=ingress makes every Ingress replica a writer"):
            build_app(AppArgs(**base, feedback_writer="ingress", **bad))


def test_a_replacement_writer_knows_the_ids_of_the_logs_recent_segments(tmp_path):
    log = open_log(tmp_path / "segs", kind="segments", group_wait_s=0.0)
    crashed = log.writer()
    assert crashed.append([_rec("a"), _rec("b")]).accepted == ["a", "b"]  # acknowledged, then the replica dies
    replacement = log.writer()
    assert replacement.writer_id != crashed.writer_id
    assert replacement.append([_rec("a"), _rec("c")]).duplicates == ["a"]  # the client's retry: not twice
    unseeded = open_log(tmp_path / "segs", kind="segments", seed_window_s=0.0).writer()
    assert unseeded.append([_rec("b")]).accepted == ["b"]  # outside the seed window: logged again
    reader = log.reader()
    assert sorted(e.event_id for e in reader.read(reader.start(), 100).events) == ["a", "b", "b", "c"]
    resumed = open_log(tmp_path / "segs", kind="segments", writer_id=crashed.writer_id).writer()
    resumed.append([_rec("d")])  # an explicit id carries on its sequence after its last segment
    assert [s.seq for s in list_segments(log.root) if s.writer == crashed.writer_id] == [1, 2]
    for w in (crashed, replacement, unseeded, resumed):
        w.close()


def test_append_async_groups_the_requests_of_one_event_loop(tmp_path):
    import asyncio

    log = open_log(tmp_path / "segs", kind="segments", group_wait_s=0.05)
    w = log.writer()

    async def main():
        return await asyncio.gather(*(w.append_async([_rec(f"a{i}")]) for i in range(10)))

    results = asyncio.run(main())
    assert [r.accepted for r in results] == [[f"a{i}"] for i in range(10)]
    assert len(list_segments(log.root)) < 10  # more requests than the loop's thread pool, grouped all the same
    w.close()
    file_writer = open_log(tmp_path / "events.jsonl").writer()  # the file log: its append in a thread
    assert asyncio.run(file_writer.append_async([_rec("f")])).accepted == ["f"]
    file_writer.close()


def test_a_conversion_record_is_an_event_and_an_unknown_type_is_not():
    from adrec.feedback import CONVERSION, parse_event

    rec = {"event_id": "e1", "user": "u", "item": "i", "type": CONVERSION, "ts": 10.0}
    ev = parse_event(rec)
    assert ev is not None and ev.type == "conversion" and ev.ts == 10.0
    assert parse_event({**rec, "type": "purchase"}) is None
