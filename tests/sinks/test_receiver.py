"""The webhook receiver over real HTTP: signature checks, dedup on webhook-id, the read-only
endpoints, the JSONL store and the failure injection the sink tests rely on."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest

from sinks.receiver import ReceiverServer
from sinks.signing import generate_secret, sign, signature_headers

SECRET = generate_secret()


@pytest.fixture
def receiver() -> Iterator[ReceiverServer]:
    """A signature-checking receiver on a free port."""
    with ReceiverServer(secret=SECRET) as r:
        yield r


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float = 5.0) -> httpx.Response:
    return httpx.post(url, content=body, headers={"content-type": "application/json", **headers},
                      timeout=timeout)


def test_bad_signatures_and_stale_timestamps_get_401_with_the_reason(receiver: ReceiverServer) -> None:
    body = b'{"id": "w1", "score": "1.500000000"}'
    assert receiver.port > 0 and receiver.url == f"http://127.0.0.1:{receiver.port}/webhook"

    r = _post(receiver.url, body, signature_headers(generate_secret(), "msg_a", body))
    assert r.status_code == 401 and "no v1 signature" in r.json()["error"]

    tampered = signature_headers(SECRET, "msg_a", body)
    r = _post(receiver.url, body.replace(b"1.5", b"9.5"), tampered)
    assert r.status_code == 401

    stale_ts = int(time.time()) - 301
    stale = {"webhook-id": "msg_a", "webhook-timestamp": str(stale_ts),
             "webhook-signature": sign(SECRET, "msg_a", stale_ts, body)}
    r = _post(receiver.url, body, stale)
    assert r.status_code == 401 and "old" in r.json()["error"]

    r = _post(receiver.url, body, {"webhook-id": "msg_a", "webhook-timestamp": str(int(time.time()))})
    assert r.status_code == 401 and "missing webhook-signature" in r.json()["error"]

    assert receiver.reports == []
    r = _post(receiver.url, body, signature_headers(SECRET, "msg_a", body))
    assert r.status_code == 200 and r.json() == {"status": "stored", "webhook_id": "msg_a"}
    assert [x["payload"] for x in receiver.reports] == [orjson.loads(body)]
    stats = receiver.stats()
    assert (stats["received"], stats["stored"], stats["rejected"], stats["duplicates"]) == (5, 1, 4, 0)


def test_duplicates_answer_200_and_are_stored_once(receiver: ReceiverServer) -> None:
    first, second = b'{"n": 1}', b'{"n": 2}'
    for _ in range(3):  # every retry is signed afresh; the id stays
        r = _post(receiver.url, first, signature_headers(SECRET, "msg_1", first))
        assert r.status_code == 200
    assert r.json()["status"] == "duplicate"
    assert _post(receiver.url, second, signature_headers(SECRET, "msg_2", second)).status_code == 200

    reports = httpx.get(f"http://127.0.0.1:{receiver.port}/reports").json()
    assert [(x["webhook_id"], x["payload"]) for x in reports] == [("msg_1", {"n": 1}), ("msg_2", {"n": 2})]
    stats = httpx.get(f"http://127.0.0.1:{receiver.port}/stats").json()
    assert (stats["received"], stats["stored"], stats["duplicates"], stats["rejected"]) == (4, 2, 2, 0)
    assert httpx.get(f"http://127.0.0.1:{receiver.port}/health").json() == {"status": "ok"}


def test_unsigned_mode_still_needs_an_id_and_json() -> None:
    with ReceiverServer() as r:
        assert _post(r.url, b'{"ok": true}', {"webhook-id": "msg_x"}).status_code == 200
        assert _post(r.url, b'{"ok": true}', {}).status_code == 400
        assert _post(r.url, b"not json", {"webhook-id": "msg_y"}).status_code == 400
        assert [x["webhook_id"] for x in r.reports] == ["msg_x"]
        assert r.stats()["rejected"] == 2


def test_store_path_appends_jsonl_and_dedup_survives_a_restart(tmp_path: Path) -> None:
    store = tmp_path / "reports.jsonl"
    with ReceiverServer(secret=SECRET, store_path=str(store)) as r:
        for i in (1, 2, 1):
            body = orjson.dumps({"n": i})
            _post(r.url, body, signature_headers(SECRET, f"msg_{i}", body))
    lines = [orjson.loads(x) for x in store.read_bytes().splitlines()]
    assert [(x["webhook_id"], x["payload"]) for x in lines] == [("msg_1", {"n": 1}), ("msg_2", {"n": 2})]
    with ReceiverServer(secret=SECRET, store_path=str(store)) as r2:
        body = orjson.dumps({"n": 2})
        assert _post(r2.url, body, signature_headers(SECRET, "msg_2", body)).json()["status"] == "duplicate"
        assert len(r2.reports) == 2
    assert len(store.read_bytes().splitlines()) == 2


def test_failure_plan_injects_statuses_and_timeouts_that_did_store() -> None:
    plan = {1: "500", 2: "429", 3: "429:1", 4: "503", 5: "timeout"}
    with ReceiverServer(secret=SECRET, failure_plan=plan.get, stall_seconds=3.0) as r:
        body = b'{"n": 1}'

        def send(timeout: float = 5.0) -> httpx.Response:
            return _post(r.url, body, signature_headers(SECRET, "msg_1", body), timeout)

        assert send().status_code == 500
        resp = send()
        assert resp.status_code == 429 and resp.headers["retry-after"] == "0"
        resp = send()
        assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
        resp = send()
        assert resp.status_code == 503 and resp.headers["retry-after"] == "0"
        assert r.reports == []  # injected statuses act on nothing
        t0 = time.monotonic()
        with pytest.raises(httpx.TimeoutException):
            send(timeout=0.5)
        assert time.monotonic() - t0 < 2.5
        assert [x["webhook_id"] for x in r.reports] == ["msg_1"]  # it DID act before stalling
        assert send().json()["status"] == "duplicate"  # so the client's retry is harmless
        stats = r.stats()
        assert stats["injected_by_kind"] == {"500": 1, "429": 2, "503": 1, "timeout": 1}
        assert (stats["received"], stats["stored"], stats["duplicates"]) == (6, 1, 1)
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 5  # stop() cut the stalled handler short
