import pytest

from udfs.split.fixed_stride import fixed_stride_spans


def test_back_to_back_with_tail_kept():
    # 23 s at 30 fps: 10 s, 10 s, then a 3 s tail (>= 2 s) kept.
    assert fixed_stride_spans(690, 30, clip_len_s=10, min_clip_s=2) == [(0, 300), (300, 600), (600, 690)]


def test_short_tail_dropped():
    # 21 s at 30 fps: the 1 s tail is under min_clip_s.
    assert fixed_stride_spans(630, 30, clip_len_s=10, min_clip_s=2) == [(0, 300), (300, 600)]


def test_video_shorter_than_one_clip():
    assert fixed_stride_spans(75, 25, clip_len_s=10, min_clip_s=2) == [(0, 75)]
    assert fixed_stride_spans(24, 24, clip_len_s=10, min_clip_s=2) == []


def test_exact_multiple_has_no_empty_tail():
    assert fixed_stride_spans(600, 30, clip_len_s=10, min_clip_s=2) == [(0, 300), (300, 600)]


def test_overlapping_stride():
    assert fixed_stride_spans(100, 10, clip_len_s=4, stride_s=3, min_clip_s=2) == [
        (0, 40), (30, 70), (60, 100)
    ]


def test_gapped_stride_and_fractional_rate():
    fps = 30000 / 1001
    spans = fixed_stride_spans(900, fps, clip_len_s=5, stride_s=10, min_clip_s=1)
    assert spans == [(0, 150), (300, 450), (599, 749)]


@pytest.mark.parametrize("kwargs", [dict(clip_len_s=0), dict(clip_len_s=5, stride_s=-1)])
def test_bad_rules_rejected(kwargs):
    with pytest.raises(ValueError):
        fixed_stride_spans(100, 10, **kwargs)
