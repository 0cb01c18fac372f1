"""Which frames ``loraengine prepare`` takes from a clip: ``--skip-first-frames``,
``--every-nth-frame``, ``--frames`` and ``--frame-sampling`` (uniform, head, tail,
random), from a video file (PyAV) and from a folder of frames. Every frame is one flat
grey whose level says its index, and the frames the Wan VAE is given are read back from
their pixels. Bad values are one line naming the option, exit 2, before anything is
encoded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import write_mp4

from loraengine.cli.main import cli
from loraengine.plugins.models.video_encoders import WanEncoder
from loraengine.testing import tiny_video as tv

FRAMES = 17  # 1 + 4·4: Wan's VAE takes 1, 5, 9, 13 or 17 of them whole
SIZE = 32


def _level(i: int) -> int:
    return 10 + 14 * i  # 10 ... 234: apart by far more than mpeg4's error on flat grey


def _grey(i: int):
    from PIL import Image

    return Image.new("RGB", (SIZE, SIZE), (_level(i),) * 3)


def _write_video(path: Path, frames: int) -> None:
    write_mp4(path, [_grey(i) for i in range(frames)])


@pytest.fixture(scope="module")
def wan(tmp_path_factory) -> Path:
    return tv.save_video("wan", tmp_path_factory.mktemp("video") / "wan")


@pytest.fixture
def clips(tmp_path) -> Path:
    """``frames/`` (PNG files) and ``movie.mp4``, each of FRAMES frames, captioned."""
    pytest.importorskip("av")
    folder = tmp_path / "clips"
    (folder / "frames").mkdir(parents=True)
    for i in range(FRAMES):
        _grey(i).save(folder / "frames" / f"{i:03d}.png")
    (folder / "frames.txt").write_text("a folder of frames")
    _write_video(folder / "movie.mp4", FRAMES)
    (folder / "movie.txt").write_text("a video file")
    return folder


@pytest.fixture
def seen(monkeypatch) -> list[list[int]]:
    """The frame indices of every clip the Wan VAE encodes (read from the pixels it is
    given; the real encoder still runs)."""
    calls: list[list[int]] = []
    real = WanEncoder.encode_videos

    def recording(self, pixels: torch.Tensor) -> torch.Tensor:
        for clip in pixels:  # [3, T, H, W] in [-1, 1]
            levels = ((clip.mean(dim=(0, 2, 3)) + 1) * 127.5).tolist()
            index = [round((v - 10) / 14) for v in levels]
            assert all(abs(v - _level(i)) < 4 for v, i in zip(levels, index, strict=True))
            calls.append(index)
        return real(self, pixels)

    monkeypatch.setattr(WanEncoder, "encode_videos", recording)
    return calls


def _prepare(model: Path, clips: Path, out: Path, *options: str):
    return CliRunner().invoke(cli, ["prepare", "--model", str(model), "--images",
                                    str(clips), "--out", str(out), "--resolution",
                                    str(SIZE), "-q", *options])


#: (options, the frames of the clip expected, worked out by hand from the option texts:
#: skip, then every n-th of the rest, then the count rounded down to 1 + 4k, spread
#: evenly / the first / the last)
CASES = [
    ((), list(range(17))),  # --frames 81 asks for more than the clip has: all 17
    (("--frames", "5"), [0, 4, 8, 12, 16]),  # uniform: 16/4 apart
    (("--frames", "9"), [0, 2, 4, 6, 8, 10, 12, 14, 16]),
    (("--frames", "5", "--frame-sampling", "head"), [0, 1, 2, 3, 4]),
    (("--frames", "5", "--frame-sampling", "tail"), [12, 13, 14, 15, 16]),
    (("--frames", "8", "--frame-sampling", "head"), [0, 1, 2, 3, 4]),  # 8 -> 5
    (("--skip-first-frames", "3", "--frames", "5", "--frame-sampling", "head"),
     [3, 4, 5, 6, 7]),
    (("--skip-first-frames", "4", "--frames", "5"), [4, 7, 10, 13, 16]),  # 13 left
    (("--skip-first-frames", "16"), [16]),  # one frame left
    (("--every-nth-frame", "2"), [0, 2, 4, 6, 8, 10, 12, 14, 16]),  # 9 kept, all
    (("--every-nth-frame", "2", "--frames", "5", "--frame-sampling", "tail"),
     [8, 10, 12, 14, 16]),
    (("--skip-first-frames", "1", "--every-nth-frame", "3", "--frame-sampling", "head"),
     [1, 4, 7, 10, 13]),  # 1, 4, ... 16 kept (6), rounded down to 5
    (("--skip-first-frames", "1", "--every-nth-frame", "3", "--frame-sampling", "tail"),
     [4, 7, 10, 13, 16]),
    (("--every-nth-frame", "20"), [0]),  # a step longer than the clip keeps its first
]


@pytest.mark.parametrize(("options", "want"), CASES, ids=[" ".join(c[0]) or "default"
                                                          for c in CASES])
def test_the_frames_taken_from_a_video_file_and_a_frame_folder(tmp_path, wan, clips, seen,
                                                               options, want):
    result = _prepare(wan, clips, tmp_path / "out", *options)
    assert result.exit_code == 0, result.output
    assert seen == [want, want]  # frames/ then movie.mp4


@pytest.mark.slow  # 1.5–3.4 s: the full suite runs it
def test_a_random_window_is_seeded_and_stays_inside_the_kept_frames(tmp_path, wan, clips,
                                                                    seen):
    options = ("--skip-first-frames", "2", "--every-nth-frame", "2", "--frames", "5",
               "--frame-sampling", "random")
    kept = list(range(2, FRAMES, 2))  # 2, 4, ... 16: 8 frames
    windows = [kept[s:s + 5] for s in range(len(kept) - 4)]
    starts = set()
    for seed in range(4):
        seen.clear()
        for run in range(2):  # the same seed picks the same window
            out = tmp_path / f"out{seed}.{run}"
            result = _prepare(wan, clips, out, *options, "--frame-seed", str(seed),
                              "--cache", str(tmp_path / f"cache{seed}.{run}"))
            assert result.exit_code == 0, result.output
        assert all(w in windows for w in seen), seen
        assert seen[0] == seen[2] and seen[1] == seen[3]
        starts.update(w[0] for w in seen)
    assert len(starts) > 1  # the seed (and the clip's name) move the window


def _one_error_line(result, option: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "rror" in line]
    assert len(errors) == 1 and option in errors[0], result.output
    return errors[0]


@pytest.mark.parametrize(("option", "value"), [
    ("--skip-first-frames", "-1"), ("--every-nth-frame", "0"), ("--every-nth-frame", "-2"),
    ("--frames", "0"), ("--frames", "-5"), ("--frame-seed", "-1")])
def test_negative_and_zero_values_are_refused_naming_the_option(tmp_path, wan, clips, seen,
                                                                option, value):
    _one_error_line(_prepare(wan, clips, tmp_path / "out", option, value), option)
    assert seen == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("skip", [FRAMES, FRAMES + 30])
def test_skipping_all_of_a_clip_is_refused_before_anything_is_encoded(tmp_path, wan, clips,
                                                                       seen, skip):
    # a longer clip first: it is not encoded either
    long = clips / "a_long"
    long.mkdir()
    for i in range(FRAMES + 40):
        _grey(i % FRAMES).save(long / f"{i:03d}.png")
    (clips / "a_long.txt").write_text("a long clip")
    line = _one_error_line(_prepare(wan, clips, tmp_path / "out", "--skip-first-frames",
                                    str(skip)), "--skip-first-frames")
    assert f"frames ({FRAMES})" in line and f"movie.mp4 ({FRAMES})" in line
    assert "a_long" not in line
    assert seen == [] and not (tmp_path / "out").exists()


def test_the_python_api_refuses_the_same_values(tmp_path, clips):
    """``prepare_video`` checks a FrameSampling the same way (no CLI ranges there)."""
    from loraengine.core.errors import ConfigError
    from loraengine.tools.prepare.video import FrameSampling, check_sampling, find_clips

    found = find_clips(clips)
    for bad, option in ((FrameSampling(skip_first=-1), "--skip-first-frames"),
                        (FrameSampling(every_nth=0), "--every-nth-frame"),
                        (FrameSampling(frames=0), "--frames"),
                        (FrameSampling(mode="middle"), "--frame-sampling"),  # type: ignore[arg-type]
                        (FrameSampling(skip_first=FRAMES), "--skip-first-frames")):
        with pytest.raises(ConfigError, match=f"^{option}"):
            check_sampling(found, bad)
    check_sampling(found, FrameSampling(skip_first=FRAMES - 1))
