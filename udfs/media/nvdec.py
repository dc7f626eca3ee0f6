"""NVDEC decode for the transcode path (`transcode.decode=auto|cpu|nvdec`).

On a GPU node the CPUs do the whole x264 encode (A100 and H100 have no
NVENC), and the source decode on top of it; every one of those GPUs has
NVDEC. With PyNvVideoCodec installed and a GPU visible, the transcode hands
the source's video to NVDEC and the encoder gets the decoded frames.

The transcode still demuxes the file with PyAV: the audio comes from that
demux, and so does the pace: each video packet PyAV reads lets one NVDEC
frame through (`NvdecFrames.__call__` stands in for `packet.decode()`).
The packets also make the clips frame-exact without decoding them: a frame's
index is its place in presentation order, and PyAV's packets say what that
order is. Every NVDEC frame must carry the next presentation timestamp of
the packets read so far (held back `REORDER` frames, so that every packet
that can precede it has been read). The first mismatch before any frame has
been handed on sends the video to the CPU decoder, from its first packet
(kept for that); a later one fails the video's open clips, as any decode
failure does. A clip is never silently shifted by a frame.

NVDEC's NV12 output is deinterleaved to yuv420p on the GPU and copied to the
host once per batch: the same planes the CPU decoder gives (H.264 decode is
bit-exact), so libx264 gets the same input either way. Sources NVDEC cannot
take or that would not come out as 8-bit 4:2:0 (MJPEG, 10-bit, 4:2:2/4:4:4,
full range, odd sizes) and remote URIs (PyNvVideoCodec reads local files)
are decoded on the CPUs, each reason logged once per process.

PyNvVideoCodec and torch are imported only when NVDEC is used, PyAV only
where a frame is made: `choose_decoder` runs anywhere.
"""

from __future__ import annotations

import collections
import functools
import heapq
import importlib.util
import logging
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from udfs.media.encoders import cuda_available, gpu_name
from udfs.uris import normalise, scheme_of

if TYPE_CHECKING:
    import av

log = logging.getLogger(__name__)

DECODES = ("auto", "cpu", "nvdec")
# Codecs NVDEC decodes (every NVDEC generation since Pascal has these; AV1
# needs Ampere or newer, and a GPU without it fails at open -> CPU).
NVDEC_CODECS = frozenset({"h264", "hevc", "av1", "vp9", "vp8", "mpeg1video", "mpeg2video"})
# What NVDEC's NV12 is, once deinterleaved: 8-bit 4:2:0, limited range.
NVDEC_PIX_FMTS = frozenset({"yuv420p"})
# Frames NVDEC's output is held behind PyAV's demux: more than any B-frame
# reordering depth (H.264 allows 16 reference frames).
REORDER = 16
# NVDEC frames converted and copied to the host at once.
BATCH = 8


class NvdecUnavailable(RuntimeError):
    """transcode.decode=nvdec cannot run on this worker."""


class NvdecError(ValueError):
    """NVDEC's frames do not match the source's packets. A ValueError, so the
    transcode records it on the video's clip rows as any decode failure."""


@dataclass(frozen=True)
class DecoderChoice:
    requested: str
    decoder: str  # "nvdec" or "cpu"
    why: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def have_pynvvideocodec() -> bool:
    try:
        return importlib.util.find_spec("PyNvVideoCodec") is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def choose_decoder(requested: str) -> DecoderChoice:
    """The decoder for `transcode.decode=requested`; raises
    `NvdecUnavailable` for an explicit nvdec that cannot run, before any
    video is opened. Once per process (a transcode task builds its stage per
    batch), so `auto`'s fallback is logged once per worker."""
    if requested not in DECODES:
        raise ValueError(f"unsupported transcode.decode {requested!r}: use auto, cpu or nvdec")
    if requested == "cpu":
        return DecoderChoice(requested, "cpu", "asked for")
    choice = _choose(requested)
    log.info("transcode decode: %s (%s)", choice.decoder, choice.why)
    return choice


def _choose(requested: str) -> DecoderChoice:
    if not have_pynvvideocodec():
        why = "PyNvVideoCodec is not installed"
    elif not cuda_available():
        why = "no CUDA GPU visible (Ray hides GPUs from tasks that ask for none: transcode.resources.num_gpus)"
    else:
        return DecoderChoice(requested, "nvdec", f"NVDEC on {gpu_name()} (PyNvVideoCodec)")
    if requested == "nvdec":
        raise NvdecUnavailable(f"transcode.decode=nvdec cannot run: {why}. Install PyNvVideoCodec "
                               "(pip install pynvvideocodec) where the transcode workers run, give them a GPU "
                               "share (transcode.resources.num_gpus > 0), or use transcode.decode=auto, which "
                               "decodes on the CPUs where NVDEC is missing")
    return DecoderChoice(requested, "cpu", f"NVDEC unusable: {why}; decoding on the CPUs")


# Per process: videos by decoder, and why videos went to the CPU (gpu_check
# reads these; the log says each reason once).
_lock = threading.Lock()
stats: collections.Counter[str] = collections.Counter()
fallbacks: collections.Counter[str] = collections.Counter()


def _count(key: str, reason: str | None = None) -> None:
    with _lock:
        stats[key] += 1
        if reason is not None:
            first = reason not in fallbacks
            fallbacks[reason] += 1
    if reason is not None and first:
        log.info("transcode: a video decoded on the CPUs instead of NVDEC: %s (said once per reason)", reason)


def why_not_nvdec(uri: str, stream: av.video.stream.VideoStream) -> str | None:
    """Why this video cannot go to NVDEC (None: it can)."""
    ctx = stream.codec_context
    if scheme_of(uri) not in ("", "file"):
        return f"{scheme_of(uri)}:// source (PyNvVideoCodec reads local files)"
    if ctx.name not in NVDEC_CODECS:
        return f"NVDEC has no {ctx.name} decoder"
    pix_fmt = ctx.format.name if ctx.format is not None else None
    if pix_fmt not in NVDEC_PIX_FMTS:
        return f"{pix_fmt} source (NVDEC's output here is 8-bit 4:2:0 limited range)"
    if ctx.width % 2 or ctx.height % 2:
        return f"odd frame size {ctx.width}x{ctx.height}"
    return None


def _cpu(packet: av.Packet) -> list[av.VideoFrame]:
    return packet.decode()


def video_decoder(choice: DecoderChoice, uri: str,
                  stream: av.video.stream.VideoStream) -> Callable[[av.Packet], list[av.VideoFrame]]:
    """What the transcode calls on each of `stream`'s packets (the flush
    packet included) instead of `packet.decode()`: NVDEC's frames where the
    worker and the video allow, else PyAV's own decode."""
    if choice.decoder != "nvdec":
        return _cpu
    reason = why_not_nvdec(uri, stream)
    if reason is None:
        try:
            return NvdecFrames(uri, stream)
        except Exception as exc:  # noqa: BLE001 - any NVDEC/driver refusal at open -> the CPU decoder
            reason = f"NVDEC would not open it ({type(exc).__name__}: {exc})"
    _count("cpu", reason)
    return _cpu


def nv12_to_i420(nv12: Any, height: int, width: int) -> Any:
    """(N, 1.5H, W) NV12 -> (N, 1.5H, W) yuv420p (Y, then U, then V, as
    PyAV's `from_ndarray(format="yuv420p")` reads them), on the tensor's device."""
    import torch

    n = nv12.shape[0]
    y = nv12[:, :height].reshape(n, -1)
    uv = nv12[:, height:].reshape(n, height // 2, width // 2, 2)
    planes = [y, uv[..., 0].reshape(n, -1), uv[..., 1].reshape(n, -1)]
    return torch.cat(planes, dim=1).view(n, height * 3 // 2, width)


def nv12_tensor(frame: Any, height: int, width: int) -> Any:
    """One NVDEC frame as a (1.5H, W) uint8 tensor, without a copy where it
    can be: DLPack gives the whole NV12 surface; else the CUDA array
    interface's two planes."""
    import torch

    shape = (height * 3 // 2, width)
    try:
        t = torch.from_dlpack(frame)
        while t.dim() > 2 and 1 in (t.shape[0], t.shape[-1]):
            t = t.squeeze(0) if t.shape[0] == 1 else t.squeeze(-1)
        if tuple(t.shape) == shape:
            return t
        got = tuple(t.shape)
    except (TypeError, RuntimeError, BufferError, AttributeError) as exc:
        got = f"{type(exc).__name__}: {exc}"
    if hasattr(frame, "cuda"):
        y, uv = (torch.as_tensor(p, device="cuda") for p in frame.cuda()[:2])
        return torch.cat([y.reshape(height, width), uv.reshape(height // 2, width)])
    raise NvdecError(f"NVDEC frame is not NV12 {shape[0]}x{shape[1]} (got {got})")


class NvdecFrames:
    """Packet -> frames for one video: NVDEC's, checked against the packets'
    presentation timestamps, or PyAV's once the video falls back (see the
    module docstring)."""

    def __init__(self, uri: str, stream: av.video.stream.VideoStream, *, gpu_id: int = 0,
                 batch: int = BATCH) -> None:
        import PyNvVideoCodec as nvc

        self.uri = uri
        self.stream = stream
        ctx = stream.codec_context
        self.width, self.height = int(ctx.width), int(ctx.height)
        # Copied onto each frame, as the CPU decoder's frames carry them (swscale reads them).
        self.colorspace, self.color_range = ctx.colorspace, ctx.color_range
        self._decoder = nvc.SimpleDecoder(normalise(uri), gpu_id=gpu_id, use_device_memory=True,
                                          output_color_type=nvc.OutputColorType.NATIVE)
        meta = self._decoder.get_stream_metadata()
        if (int(meta.width), int(meta.height)) != (self.width, self.height):
            raise NvdecError(f"NVDEC sees {meta.width}x{meta.height}, PyAV {self.width}x{self.height}")
        self.batch = batch
        self._pts: list[int] = []  # heap: presentation timestamps of packets not yet matched
        self._held: list[av.Packet] | None = []  # every packet, until the first frame is checked
        self._ready: collections.deque[tuple[int, Any]] = collections.deque()  # (pts, host I420 array)
        self._ended = False
        self.frames = 0
        self.cpu_reason: str | None = None

    def __call__(self, packet: av.Packet) -> list[av.VideoFrame]:
        if self.cpu_reason is not None:
            return packet.decode()
        flush = packet.size == 0
        if not flush:
            if self._held is not None:
                self._held.append(packet)
            if packet.pts is None:
                if self._held is None:
                    raise NvdecError(f"video packet {self.frames + len(self._pts)} has no timestamp")
                return self._mismatch(packet, "a video packet without a timestamp")
            # FFmpeg's decoder drops a discarded packet's frame (edit lists), so NVDEC's must not show.
            if not packet.is_discard:
                heapq.heappush(self._pts, int(packet.pts))
        out: list[av.VideoFrame] = []
        while len(self._pts) > (0 if flush else REORDER):
            try:
                got = self._next()
            except Exception as exc:  # noqa: BLE001 - whatever NVDEC or the driver raises
                reason = f"NVDEC failed at frame {self.frames} ({type(exc).__name__}: {exc})"
                if self._held is not None:
                    return self._mismatch(packet, reason)
                raise NvdecError(reason) from exc
            expected = heapq.heappop(self._pts)
            if got is None or got[0] != expected:
                seen = "no frame" if got is None else f"pts {got[0]}"
                reason = f"NVDEC gave {seen} for frame {self.frames}, the packets say pts {expected}"
                if self._held is not None:
                    return self._mismatch(packet, reason)
                raise NvdecError(reason)
            if self._held is not None:
                self._held = None  # checked: NVDEC and PyAV agree from the first frame
                _count("nvdec")
            out.append(self._frame(*got))
            self.frames += 1
        if flush:
            self._close()
        return out

    def _next(self) -> tuple[int, Any] | None:
        if not self._ready and not self._ended:
            self._decode_batch()
        return self._ready.popleft() if self._ready else None

    def _decode_batch(self) -> None:
        import torch

        frames = self._decoder.get_batch_frames(self.batch)
        if not frames:
            self._ended = True
            return
        nv12 = torch.stack([nv12_tensor(f, self.height, self.width) for f in frames])
        if nv12.is_cuda:
            torch.cuda.synchronize(nv12.device)  # NVDEC writes on its own stream
        host = nv12_to_i420(nv12, self.height, self.width).cpu().numpy()
        for f, planes in zip(frames, host):
            self._ready.append((int(f.getPTS()), planes))

    def _frame(self, pts: int, planes: Any) -> av.VideoFrame:
        import av

        frame = av.VideoFrame.from_ndarray(planes, format="yuv420p")
        frame.pts = pts
        frame.time_base = self.stream.time_base
        frame.colorspace, frame.color_range = self.colorspace, self.color_range
        return frame

    def _mismatch(self, packet: av.Packet, reason: str) -> list[av.VideoFrame]:
        """Nothing handed on yet: the video goes to PyAV from its first packet."""
        held, self._held = self._held or [], None
        self.cpu_reason = reason
        self._close()
        _count("cpu", f"NVDEC frames did not match the source ({reason})")
        out: list[av.VideoFrame] = []
        for p in held:
            out += p.decode()
        if packet.size == 0:
            out += packet.decode()
        return out

    def _close(self) -> None:
        self._ready.clear()
        self._ended = True
        self._decoder = None
