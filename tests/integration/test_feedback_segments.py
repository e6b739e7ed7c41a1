"""The segment log of feedback against a real S3 server (moto's, on 127.0.0.1, started and stopped by PID):
group commit, two writers read once in the defined order, and a PUT that fails on the wire.

(The learner killed mid-stream on a segment log: tests/integration/test_online_learner.py.)
"""

from __future__ import annotations

import threading
import time
import uuid

import boto3
import pytest

from adrec import storage
from adrec.feedback import FeedbackWriteError, open_log
from adrec.feedback.segments import SEGMENT_RE
from adrec.feedback.records import decode_lines
from tests.support.tcp_proxy import TcpProxy


def _rec(eid: str) -> dict:
    return {"event_id": eid, "user": "u_abc", "item": "i1", "type": "impression", "ts": 1.0, "context": {"slot": 1}}


def _prefix() -> str:
    return f"fb-{uuid.uuid4().hex[:8]}"


def _store(srv):
    return boto3.client("s3", endpoint_url=srv.endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                        region_name="us-east-1")


def _ids_in_defined_order(srv, prefix: str) -> list[str]:
    """The log's records read straight from the store (boto3, not adrec), ordered as the module says:
    segments by (commit ms, writer, seq), lines in file order."""
    segs = []
    for key in srv.keys(prefix + "/"):
        writer, name = key[len(prefix) + 1:].split("/")
        m = SEGMENT_RE.match(name)
        assert m, key
        segs.append((int(m[2]), writer, int(m[1]), key))
    s3 = _store(srv)
    return [r["event_id"] for *_, key in sorted(segs)
            for r in decode_lines(s3.get_object(Bucket=srv.bucket, Key=key)["Body"].read())]


@pytest.fixture
def proxied(s3_server, monkeypatch):
    """A segment log reached through a :class:`TcpProxy` in front of the S3 server: (proxy, prefix, log)."""
    proxy = TcpProxy(s3_server.port)
    for k, v in {**s3_server.env, "AWS_ENDPOINT_URL": proxy.endpoint}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(storage, "_fs_cache", {})
    prefix = _prefix()
    yield proxy, prefix, open_log(f"s3://{s3_server.bucket}/{prefix}", group_wait_s=0.0)
    proxy.close()


def test_group_commit_writes_fewer_segments_than_requests(s3_env):
    prefix = _prefix()
    log = open_log(f"s3://{s3_env.bucket}/{prefix}", group_wait_s=0.02)
    writer = log.writer()
    n = 12
    start = threading.Barrier(n)
    results, latencies = {}, []

    def send(i: int) -> None:
        start.wait()
        t = time.perf_counter()
        results[i] = writer.append([_rec(f"r{i}-{k}") for k in range(5)])
        latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # every request acknowledged, each with its own events
    assert sorted(results) == list(range(n))
    assert all(results[i].accepted == [f"r{i}-{k}" for k in range(5)] and not results[i].duplicates for i in range(n))
    keys = s3_env.keys(prefix + "/")
    assert 1 <= len(keys) < n and writer.segments_written == len(keys), keys  # grouped: fewer writes than requests
    reader = log.reader()
    res = reader.read(reader.start(), 10_000)
    got = [e.event_id for e in res.events]
    assert sorted(got) == sorted(f"r{i}-{k}" for i in range(n) for k in range(5)) and len(set(got)) == len(got)
    assert got == _ids_in_defined_order(s3_env, prefix)
    assert reader.caught_up(res.end) and reader.size() > 0
    # a retry of acknowledged events: duplicates, and no new segment
    again = writer.append([_rec("r0-0"), _rec("r3-4")])
    assert again.accepted == [] and again.duplicates == ["r0-0", "r3-4"] and len(s3_env.keys(prefix + "/")) == len(keys)
    writer.close()


def test_two_writers_interleaved_are_read_once_in_the_defined_order(s3_env):
    prefix = _prefix()
    log = open_log(f"s3://{s3_env.bucket}/{prefix}", group_wait_s=0.0)
    a, b = log.writer(), log.writer()
    assert a.writer_id != b.writer_id
    sent = []
    for i in range(8):  # interleaved: a, b, a, b, ...
        for w, name in ((a, "a"), (b, "b")):
            batch = [_rec(f"{name}{i}-{k}") for k in range(3)]
            assert w.append(batch).accepted == [r["event_id"] for r in batch]
            sent += [r["event_id"] for r in batch]
    want = _ids_in_defined_order(s3_env, prefix)
    assert sorted(want) == sorted(sent)

    reader = log.reader()
    whole = reader.read(reader.start(), 10_000)
    assert [e.event_id for e in whole.events] == want
    assert whole.end.state() == {"writers": {a.writer_id: [9, 0], b.writer_id: [9, 0]}}  # seqs 1..8 of each
    # in small reads, from checkpointed positions (as the learner resumes): the same order, each record once
    got, pos = [], reader.start()
    while True:
        res = reader.read(pos, 5)
        if not res.records:
            break
        got += [e.event_id for e in res.events]
        pos = open_log(f"s3://{s3_env.bucket}/{prefix}").reader().position(res.end.state())  # a fresh reader
    assert got == want and pos == whole.end
    # what comes later is read from there, once
    b.append([_rec("late-b")])
    a.append([_rec("late-a")])
    res = reader.read(pos, 100)
    assert [e.event_id for e in res.events] == ["late-b", "late-a"]
    assert reader.read(res.end, 100).records == [] and reader.caught_up(res.end)
    a.close()
    b.close()


def test_a_put_that_fails_on_the_wire_is_not_acknowledged_and_leaves_nothing_visible(s3_server, proxied):
    proxy, prefix, log = proxied
    writer = log.writer()
    assert writer.append([_rec("ok-1"), _rec("ok-2")]).accepted == ["ok-1", "ok-2"]
    before = s3_server.keys(prefix + "/")  # straight from the server, not through the proxy
    assert len(before) == 1
    acked = ["ok-1", "ok-2"]
    for mode, batch in (("cut", ["torn-1", "torn-2"]), ("down", ["gone-1"])):
        proxy.mode = mode  # "cut": the PUT's body is torn off mid-upload; "down": the server is unreachable
        t = time.monotonic()
        with pytest.raises(FeedbackWriteError, match="could not be written"):
            writer.append([_rec(e) for e in batch])
        assert time.monotonic() - t < 60
        assert s3_server.keys(prefix + "/") == before, mode  # no object, not even a partial one
        proxy.mode = "pass"
        reader = log.reader()
        assert [e.event_id for e in reader.read(reader.start(), 100).events] == acked, mode
        # the client retries: stored now (not taken for a duplicate of what failed), and read once
        assert writer.append([_rec(e) for e in batch]).accepted == batch
        acked += batch
        before = s3_server.keys(prefix + "/")
    assert proxy.cuts >= 1
    assert writer.append([_rec("torn-1")]).duplicates == ["torn-1"]
    reader = log.reader()
    assert [e.event_id for e in reader.read(reader.start(), 100).events] == acked
    seqs = sorted(int(SEGMENT_RE.match(k.rsplit("/", 1)[1])[1]) for k in s3_server.keys(prefix + "/"))
    assert seqs == [1, 3, 5]  # the failed writes' numbers (2, 4) are never used again
    writer.close()


def test_a_write_the_store_took_though_the_writer_saw_an_error_is_logged_once(s3_server, proxied, caplog):
    proxy, prefix, log = proxied
    writer = log.writer()
    proxy.mode = "lose-reply"
    with pytest.raises(FeedbackWriteError):
        writer.append([_rec("x-1"), _rec("x-2")])  # not acknowledged (503) ...
    assert proxy.lost_replies >= 1 and len(s3_server.keys(prefix + "/")) == 1  # ... yet on the store
    proxy.mode = "pass"
    with caplog.at_level("WARNING", logger="adrec.feedback.segments"):
        assert writer.append([_rec("y-1")]).accepted == ["y-1"]  # the writer looks first, and finds it
    assert "although its write reported an error" in caplog.text
    retry = writer.append([_rec("x-1"), _rec("x-2")])  # the client's retry: already in the log
    assert retry.accepted == [] and retry.duplicates == ["x-1", "x-2"]
    reader = log.reader()
    assert [e.event_id for e in reader.read(reader.start(), 100).events] == ["x-1", "x-2", "y-1"]
    writer.close()
