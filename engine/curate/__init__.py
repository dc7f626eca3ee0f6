"""task=curate: input videos -> `clips.lance`, `videos.lance`, `summary.json`.

`task` plans and runs the stream; `ledger` admits videos and tracks them;
`commits` turns finished videos into table versions; `resume` checks that a
second run would make the same clips; `input_chunks` lists the inputs."""

from engine.curate.task import run

__all__ = ["run"]
