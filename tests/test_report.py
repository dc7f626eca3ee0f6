"""The end-of-run report: input errors grouped by cause with a hint, from
the messages real bad files give, and a run that made no clip fails loudly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.curate.report import cause_of, group_errors, no_clips_reason
from udfs.media.probe import probe_video

REPO = Path(__file__).resolve().parent.parent


def write_audio_only(path: Path) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), dtype=np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)


@pytest.fixture()
def bad_inputs(tmp_path) -> Path:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "empty.mp4").write_bytes(b"")
    (folder / "noise.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    (folder / "notes.mp4").write_text("not a video\n")
    write_audio_only(folder / "voice.mp4")
    return folder


def test_real_bad_files_are_grouped_by_cause_with_hints(bad_inputs):
    uris = [str(p) for p in sorted(bad_inputs.iterdir())] + [str(bad_inputs / "gone.mp4")]
    rows = [probe_video(uri) for uri in uris]
    groups = {g["cause"]: g for g in group_errors([{"uri": r["uri"], "error": r["error"]} for r in rows])}
    assert {cause: g["count"] for cause, g in groups.items()} == {
        "truncated or corrupt file": 2, "no video stream": 1, "empty file": 1, "permission or network": 1}
    assert [os.path.basename(e["uri"]) for e in groups["truncated or corrupt file"]["examples"]] == [
        "noise.mp4", "notes.mp4"]
    assert "audio-only" in groups["no video stream"]["hint"]
    assert "credentials" in groups["permission or network"]["hint"]


def test_an_undecodable_codec_is_named_in_the_hint():
    errors = [{"uri": "a.mkv", "error": "probe failed: DecoderNotFoundError: Decoder not found", "codec": "vvc"},
              {"uri": "b.mkv", "error": "decode failed at frame 0: Decoder (codec vvc) not found"}]
    (group,) = group_errors(errors)
    assert group["cause"] == "codec not decodable here" and group["count"] == 2
    assert "cannot decode vvc" in group["hint"]
    assert cause_of("encode failed: ValueError: odd width").name == "other"


def test_no_clips_reason_names_the_one_cause():
    summary = {"videos": 3, "videos_failed": 3, "clips": 0,
               "error_groups": group_errors([{"uri": f"{i}.mp4", "error": "probe failed: ValueError: file is empty"}
                                             for i in range(3)])}
    assert no_clips_reason(summary).startswith("all 3 input videos failed the same way (empty file)")
    assert no_clips_reason({**summary, "clips": 1}) is None
    assert no_clips_reason({"videos": 0, "videos_failed": 0, "clips": 0}) is None


@pytest.mark.slow
def test_a_run_whose_inputs_all_fail_exits_nonzero_and_says_why(bad_inputs, tmp_path):
    for path in list(bad_inputs.iterdir()):
        if path.name != "noise.mp4":
            path.unlink()
    for i in range(2):
        (bad_inputs / f"noise{i}.mp4").write_bytes(os.urandom(4000))
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "engine", f"input={bad_inputs}", f"output={out}", "ray.num_cpus=2"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode != 0, log[-3000:]
    assert "no clips: all 3 input videos failed the same way (truncated or corrupt file)" in log, log[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [(g["cause"], g["count"]) for g in summary["error_groups"]] == [("truncated or corrupt file", 3)]
