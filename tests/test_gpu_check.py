"""scripts/gpu_check.py: the CPU dry run CI can do, and its plumbing on a
machine shaped like the lent GPU box (no PyAV, Ray, Lance or Hydra)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
ROWS = ["nvenc_probe", "nvenc_transcode", "nvdec_transcode", "nvdec_scene_decode", "transnetv2_cuda", "clip_embed_bf16",
        "cosmos_embed1_bf16", "qwen_vl_caption_bf16", "dedup_kmeans_pairwise", "text_detector_cuda"]

# Runs the script as __main__ with packages the GPU machine lacks made unimportable.
GPU_BOX = """
import runpy, sys
for name in ("av", "ray", "lance", "hydra", "omegaconf", "polars"):
    sys.modules[name] = None
sys.argv = [{script!r}, *{args!r}]
try:
    runpy.run_path({script!r}, run_name="__main__")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
assert not any(isinstance(sys.modules.get(m), type(sys)) for m in ("av", "ray", "lance", "hydra")), "imported"
sys.exit(code)
"""


def run(args: list[str], tmp_path: Path, gpu_box: bool = False) -> tuple[int, list[dict], str]:
    out = tmp_path / "rows.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    if gpu_box:
        cmd = [sys.executable, "-c", GPU_BOX.format(script=str(SCRIPT), args=[*args, "--json", str(out)])]
    else:
        cmd = [sys.executable, str(SCRIPT), *args, "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    rows = json.loads(out.read_text()) if out.exists() else []
    return proc.returncode, rows, proc.stdout + proc.stderr


def test_dry_run_without_gpu_skips_every_row(tmp_path):
    code, rows, output = run([], tmp_path)
    assert code == 0, output
    assert [r["name"] for r in rows] == ROWS
    assert all(r["status"] == "skipped: no GPU" for r in rows), rows
    assert "| nvenc_transcode | skipped: no GPU |" in output
    assert "| nvdec_transcode | skipped: no GPU |" in output and "| text_detector_cuda | skipped: no GPU |" in output


@pytest.mark.slow
def test_checks_run_where_pyav_ray_lance_hydra_are_missing(tmp_path):
    """The smoke run (CPU, tiny models) on an interpreter that cannot import
    av/ray/lance/hydra: the PyAV rows say so, the model rows compare bf16
    with fp32 through the real stage classes."""
    code, rows, output = run(["--smoke"], tmp_path, gpu_box=True)
    assert code == 0, output
    status = {r["name"]: r["status"] for r in rows}
    assert status["nvenc_probe"] == status["nvenc_transcode"] == "skipped: no av (PyAV)"
    assert status["nvdec_scene_decode"] == status["nvdec_transcode"] == "skipped: no av (PyAV)"
    for name in ("transnetv2_cuda", "clip_embed_bf16", "cosmos_embed1_bf16", "qwen_vl_caption_bf16"):
        assert status[name] == "ok", (name, output)
    assert status["dedup_kmeans_pairwise"] == "ok", output
    # onnxruntime (CPU build), scipy and the PP-OCRv4 model are in this venv: CPU provider against itself.
    assert status["text_detector_cuda"] == "ok", output


def load_script(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_text_row_skips_with_the_reason_where_onnxruntime_has_no_cuda_provider(tmp_path, monkeypatch):
    script = load_script(monkeypatch)
    monkeypatch.setattr(script, "DEVICE", "cuda")
    row = None
    try:
        script.check_text_detector(tmp_path)
    except script.Skip as exc:
        row = str(exc)
    assert row is not None and "has no CUDA provider (onnxruntime-gpu not installed" in row


@pytest.mark.slow
def test_nvdec_transcode_row_with_a_fake_nvdec(tmp_path, monkeypatch):
    """The row's own plumbing on CPU: CUDA faked, PyNvVideoCodec the stand-in of
    tests/test_nvdec.py (PyAV's frames as NV12), tiny video."""
    spec = importlib.util.spec_from_file_location("nvdec_fakes", Path(__file__).with_name("test_nvdec.py"))
    fakes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fakes)
    from udfs.media import nvdec

    monkeypatch.setitem(sys.modules, "PyNvVideoCodec", fakes.fake_pynvvideocodec())
    monkeypatch.setattr(nvdec, "cuda_available", lambda: True)
    nvdec.choose_decoder.cache_clear()
    script = load_script(monkeypatch)
    monkeypatch.setattr(script, "DEVICE", "cuda")
    monkeypatch.setattr(script, "SIZES", script.TINY)
    try:
        row = script.check_nvdec_transcode(tmp_path)
    finally:
        nvdec.choose_decoder.cache_clear()
    assert row.status == "ok", row
    assert "2 clips, same spans, frame-exact; decoded planes equal to PyAV's in 360/360 frames" in row.check
