"""reelsift's Hydra configuration: `config.yaml` and one folder per group.

This folder ships inside the wheel as the package `reelsift_conf`
(pyproject.toml maps it), so an installed `reelsift` finds its defaults
wherever it runs; in a checkout the editable install maps the same name
here."""

from pathlib import Path

DIR = str(Path(__file__).resolve().parent)
