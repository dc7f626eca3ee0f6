"""labels.lance: the log, the state it gives, and the readers' filter."""

from __future__ import annotations

import lance
import pyarrow as pa

from engine.store.labels import LabelStore, labels_uri, rejected_ids
from engine.store.views import resolve_where, without_clips


def test_labels_live_beside_the_table():
    assert labels_uri("/x/out/clips.lance") == "/x/out/labels.lance"
    assert labels_uri("s3://b/run/clips.lance/") == "s3://b/run/labels.lance"


def test_the_latest_decision_wins_and_tags_accumulate(tmp_path):
    table = str(tmp_path / "clips.lance")
    store = LabelStore(table, None)
    assert store.rejected() == [] and store.state().num_rows == 0
    store.append(["a", "b", "c"], "reject", note="shaky")
    store.append(["b"], "accept")
    store.append(["c"], "clear")
    store.append(["a"], "tag", tag="night")
    store.append(["a"], "tag", tag="rain")
    store.append(["a"], "untag", tag="night")
    assert store.rejected() == ["a"]
    state = {r["clip_id"]: r for r in store.state().to_pylist()}
    assert state["a"]["label"] == "reject" and state["a"]["tags"] == ["rain"] and state["a"]["note"] == "shaky"
    assert state["b"]["label"] == "accept" and state["c"]["label"] is None
    log = lance.dataset(tmp_path / "labels.lance").to_table()
    assert log.num_rows == 3 + 1 + 1 + 3 and set(log.column_names) == {"clip_id", "label", "tag", "note", "time"}
    assert rejected_ids(log) == ["a"]


def test_readers_leave_rejected_clips_out():
    schema = pa.schema([("clip_id", pa.string()), ("passed", pa.bool_()), ("error", pa.string())])
    assert resolve_where(None, schema, ["x'1"]) == "(passed AND error IS NULL) AND clip_id NOT IN ('x''1')"
    assert resolve_where("all", schema, ["a", "b"]) == "clip_id NOT IN ('a', 'b')"
    assert resolve_where("all", schema) is None
    assert without_clips("end_s > 2", []) == "end_s > 2"
