"""What went wrong in a curate run, said so a person can act on it: input
errors grouped by cause, each with a hint, and the reasons clips were
filtered. The groups go in summary.json and in the end-of-run log."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import polars as pl

from udfs.analysis.rules import reason_names


@dataclass(frozen=True)
class Cause:
    name: str
    pattern: re.Pattern[str]
    hint: str


# Checked in order: the first that matches names the cause. Patterns match
# the messages the stages record (`probe failed: ...`, `decode failed ...`),
# which carry FFmpeg's and the object store's own words.
CAUSES = (
    Cause("empty file", re.compile(r"file is empty"),
          "the file has no bytes: an interrupted copy or download; copy it again"),
    Cause("no video stream", re.compile(r"no video stream|video stream has no (frame size|frames)"),
          "audio-only or not a video at all; leave it out of the input (input_extensions narrows a folder)"),
    Cause("codec not decodable here",
          re.compile(r"decoder[^:]*not found|codec not currently supported|unknown codec|no decoder|"
                     r"unsupported codec|DecoderNotFound", re.I),
          "this FFmpeg build (PyAV's wheel) cannot decode {codec}; transcode those inputs to H.264 first, "
          "or install a PyAV built with that decoder"),
    Cause("truncated or corrupt file",
          re.compile(r"invalid ?data|end of file|moov atom|truncat|corrupt|\beof\b", re.I),
          "the file is damaged or incomplete (often a copy cut short); copy it again"),
    Cause("permission or network",
          re.compile(r"permission|access denied|forbidden|\b40[134]\b|no such file|FileNotFound|NoSuchKey|"
                     r"timed? ?out|connection|network|unreachable|credentials", re.I),
          "check the path, the credentials (storage_options) and that the store is reachable; "
          "read_retries sets how hard reads are retried"),
)
OTHER = Cause("other", re.compile(""), "see the error message; report it if it looks like a bug of ours")
_CODEC = re.compile(r"codec[\s:(]+'?([A-Za-z0-9_]+)|\(([a-z0-9_]+)\) not found|decoder '?([a-z0-9_]+)'? not found", re.I)


def cause_of(error: str) -> Cause:
    return next((cause for cause in CAUSES if cause.pattern.search(error)), OTHER)


def _codec_in(error: str) -> str | None:
    match = _CODEC.search(error)
    return next((g for g in match.groups() if g), None) if match else None


def group_errors(errors: list[dict[str, Any]], *, examples: int = 3) -> list[dict[str, Any]]:
    """`errors` ({uri, error, codec?} rows) grouped by cause, largest group first:
    {cause, count, hint, examples: [{uri, error}]}."""
    groups: dict[str, dict[str, Any]] = {}
    for row in errors:
        cause = cause_of(str(row["error"]))
        group = groups.setdefault(cause.name, {"cause": cause.name, "count": 0, "hint": cause.hint,
                                               "codecs": Counter(), "examples": []})
        group["count"] += 1
        codec = _codec_in(str(row["error"])) or row.get("codec")
        if cause.name == "codec not decodable here" and codec:
            group["codecs"][codec] += 1
        if len(group["examples"]) < examples:
            group["examples"].append({"uri": row["uri"], "error": row["error"]})
    out = []
    for group in sorted(groups.values(), key=lambda g: -g["count"]):
        codecs = group.pop("codecs")
        named = ", ".join(codecs) if codecs else "their codec"
        out.append({**group, "hint": group["hint"].format(codec=named)})
    return out


def filter_reasons(reasons: pl.Series) -> dict[str, int]:
    """How many clips each filter removed (a clip failing two counts for
    both), most first."""
    counts = Counter(name for r in reasons.drop_nulls().to_list() for name in reason_names(r))
    return dict(counts.most_common())


def no_clips_reason(summary: dict[str, Any]) -> str | None:
    """Why a run that had inputs made no clip at all, or None when it made
    some (or had no input)."""
    if not summary["videos"] or summary["clips"]:
        return None
    groups = summary.get("error_groups") or []
    if summary["videos_failed"] == summary["videos"] and len(groups) == 1:
        group = groups[0]
        return (f"all {summary['videos']} input videos failed the same way ({group['cause']}), e.g. "
                f"{group['examples'][0]['uri']}: {group['examples'][0]['error']}. Hint: {group['hint']}")
    if summary["videos_failed"]:
        causes = "; ".join(f"{g['count']} x {g['cause']}" for g in groups)
        return f"{summary['videos_failed']} of {summary['videos']} input videos failed ({causes}); no clip was made"
    return (f"{summary['videos']} input videos were read but no clip was made: every video is shorter than the "
            "split's shortest clip, or every clip failed (clips_failed); see summary.json")
