"""``loraengine prepare --captions`` with hostile files: each one error line naming the
file, before any model is loaded, and nothing written."""

from __future__ import annotations

import os

import pytest
from click.testing import CliRunner

from loraengine.cli.main import cli
from loraengine.testing import tiny_pipelines as tp


def _prepare(tmp_path, captions):
    images = tmp_path / "images"
    if not images.exists():
        tp.write_images(images, [(16, 16)], captions=False)
    # --model is an existing folder that is no pipeline: the captions are checked first
    result = CliRunner().invoke(cli, ["prepare", "--model", str(tmp_path), "--images",
                                      str(images), "--out", str(tmp_path / "out"),
                                      "--captions", str(captions)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1, result.output
    assert any(lines[0].startswith(f"error: --captions{sep}{captions}")
               for sep in (": ", " ", ": cannot read ")), result.output
    assert not (tmp_path / "out").exists()
    return lines[0]


CASES = {
    "nested_100000.json": ("[" * 100000 + "]" * 100000, "nested too deeply"),
    "nested_object.json": ('{"a.png": ' + '{"x": ' * 50000 + "1" + "}" * 50001,
                           "nested too deeply"),
    "huge_int.json": ('{"a.png": ' + "9" * 20000 + "}", "not valid JSON: Exceeds"),
    "truncated.json": ('{"a.png": "a cat', "not valid JSON: Unterminated string"),
    "list.json": ('["a.png", "a cat"]', "expected a JSON object mapping"),
    "number_caption.json": ('{"a.png": 3}', "expected a JSON object mapping"),
    "duplicate.json": ('{"a.png": "one", "a.png": "two"}', "the key 'a.png' appears twice"),
    "nan.json": ('{"a.png": NaN}', "expected a JSON object mapping"),
    "nested.jsonl": ('{"file_name": "a.png", "text": "x"}\n' + "[" * 100000,
                     ":2: nested too deeply"),
    "duplicate.jsonl": ('{"file_name": "a.png", "text": "x"}\n\n'
                        '{"file_name": "a.png", "text": "y"}\n',
                        ":3: 'a.png' has a caption on line 1 already"),
    "scalar.jsonl": ('"just a string"\n', ":1: expected a JSON object"),
    "empty.json": ("", "not valid JSON: Expecting value"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_hostile_captions_file_is_one_line_naming_it(tmp_path, name):
    text, expected = CASES[name]
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    line = _prepare(tmp_path, path)
    assert expected in line, line


def test_captions_not_utf8_name_the_byte_and_line(tmp_path):
    path = tmp_path / "caps.json"
    raw = b'{"a.png":\n "caf\xe9"}'
    path.write_bytes(raw)
    line = _prepare(tmp_path, path)
    at = raw.index(b"\xe9")
    assert line == (f"error: --captions {path}: not UTF-8 text (byte 0xe9 at offset {at}, "
                    f"line 2)")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this system")
def test_a_fifo_or_folder_as_captions_is_refused_without_reading(tmp_path):
    fifo = tmp_path / "caps.json"
    os.mkfifo(fifo)
    assert _prepare(tmp_path, fifo) == f"error: --captions {fifo}: not a regular file"
    folder = tmp_path / "dir.json"
    folder.mkdir()
    assert _prepare(tmp_path, folder) == f"error: --captions {folder}: not a regular file"


def test_images_that_are_no_folder_are_said_before_the_model_loads(tmp_path):
    (tmp_path / "afile").write_text("x")
    for images in (tmp_path / "afile", tmp_path / "nope"):
        result = CliRunner().invoke(cli, ["prepare", "--model", str(tmp_path), "--images",
                                          str(images), "--out", str(tmp_path / "out")])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert result.output.strip() == f"error: --images: {images} is not a folder"
