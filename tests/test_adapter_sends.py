"""No adapter sent twice (``fedlora.server.adapter_sends``, ``fedlora.client.adapter_cache``): a
site that holds the adapter a message names by digest is not sent its bytes again; one that
does not is sent them in full; a site never uses bytes that do not hash to the digest named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, RecordDict

import fedlora.simulation.runner as runner
from fedlora.client import adapter_cache, secagg_site
from fedlora.errors import AdapterNotHeld, ProtocolError
from fedlora.protocol import AdapterRef, record_of
from fedlora.records import adapter_digest, to_record


def _record(seed: int):
    rng = np.random.default_rng(seed)
    return to_record({"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}, "float32")[0]


def _content(record, digest: str | None = None, with_bytes: bool = True) -> RecordDict:
    content = RecordDict({"config": ConfigRecord({"round": 1}), AdapterRef.record: record_of(AdapterRef(digest=digest or adapter_digest(record)))})
    if with_bytes:
        content["adapter"] = record
    return content


def test_a_site_uses_only_an_adapter_whose_bytes_hash_to_the_digest_named() -> None:
    adapter_cache.forget()
    one, two = _record(1), _record(2)
    with pytest.raises(AdapterNotHeld, match="does not hold the adapter"):
        adapter_cache.adapter_for(_content(one, with_bytes=False), "train")
    assert adapter_cache.adapter_for(_content(one), "train") is not None  # received in full: kept
    held = adapter_cache.adapter_for(_content(one, with_bytes=False), "evaluate")  # named only: the kept one
    assert adapter_digest(held) == adapter_digest(one)
    # a coordinator pairing one digest with other bytes (so that secure-aggregation peers, whose request digests cover the
    # adapter's digest only, would train from different adapters) is refused
    with pytest.raises(ProtocolError, match="hash to .* not to the digest"):
        adapter_cache.adapter_for(_content(two, digest=adapter_digest(one)), "train")
    with pytest.raises(ProtocolError, match="no array record 'adapter'"):
        adapter_cache.adapter_for(RecordDict({"config": ConfigRecord({})}), "train")
    for i in range(adapter_cache.MAX_ADAPTERS + 1):  # bounded: the least recently used goes first
        adapter_cache.adapter_for(_content(_record(100 + i)), "train")
    with pytest.raises(AdapterNotHeld):
        adapter_cache.adapter_for(_content(one, with_bytes=False), "train")
    adapter_cache.forget()


def test_the_request_digest_is_the_same_with_or_without_the_adapters_bytes() -> None:
    """Secure-aggregation peers compare request digests: one sent the bytes and one named them by
    digest were asked the same; another adapter under its own digest is another request."""
    one = _record(1)
    assert secagg_site.request_digest(_content(one)) == secagg_site.request_digest(_content(one, with_bytes=False))
    assert secagg_site.request_digest(_content(one)) != secagg_site.request_digest(_content(_record(2)))


def _lines(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_no_adapter_is_sent_twice_and_a_site_that_lost_it_gets_it_in_full(make_config, tmp_path: Path, monkeypatch) -> None:
    over = dict(train__rounds=3, cohorts={"finance": {"sites": 3}}, secure_aggregation={"enabled": True, "allow_clear": False})
    adapter_cache.forget()
    straight, summary = runner.simulate(make_config(tmp_path / "straight", **over), progress=False)
    lines = _lines(straight)
    # round 0 evaluates the initial adapter; every later train names the adapter the sites evaluated just before
    assert [x.get("adapters_not_resent") for x in lines[1:]] == [3, 3, 3]

    real = runner.make_client_app

    def factory(*a, **kw):  # every site forgets every adapter before each train: the coordinator must resend in full
        app = real(*a, **kw)

        def client(msg, ctx):
            if msg.metadata.message_type == "train":
                adapter_cache.forget()
            return app(msg, ctx)
        return client

    monkeypatch.setattr(runner, "make_client_app", factory)
    forgetful, again = runner.simulate(make_config(tmp_path / "forgetful", **over), progress=False)
    assert [x.get("adapters_not_resent") for x in _lines(forgetful)[1:]] == [0, 0, 0]
    a = (straight / "adapters" / "finance" / "adapter_model.safetensors").read_bytes()
    assert a == (forgetful / "adapters" / "finance" / "adapter_model.safetensors").read_bytes()
    assert again["bytes_down"] > summary["bytes_down"]  # the adapter went again to every site, every round
    per_round = [x["bytes_down"] for x in lines[2:]]
    resent = [x["bytes_down"] for x in _lines(forgetful)[2:]]
    assert all(b < c for b, c in zip(per_round, resent))
