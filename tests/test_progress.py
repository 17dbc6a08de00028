"""Progress outside a terminal or notebook: plain lines with count, rate and time left."""
import re

from surgvqa.progress import Lines, progress_bar


def test_outside_a_terminal_progress_is_plain_lines(capsys):
    bar = progress_bar(total=4, desc="encode question audio", unit="file")
    assert isinstance(bar, Lines)  # pytest captures stderr: no terminal, no notebook kernel
    bar.every_s = 0.0
    for _ in range(4):
        bar.update()
    bar.close()
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 5  # one per update (every_s 0) and the closing one
    assert re.fullmatch(r"encode question audio: 1/4 file in \d+s \([\d.]+ file/s, \d+s left\)", lines[0]), lines[0]
    assert lines[-1].startswith("encode question audio: 4/4 file") and "left" not in lines[-1]


def test_iterating_counts_and_a_disabled_bar_says_nothing(capsys):
    assert list(Lines(range(3), desc="predict (audio)", every_s=3600)) == [0, 1, 2]
    assert capsys.readouterr().err.startswith("predict (audio): 3/3 it")
    quiet = Lines(range(3), disable=True, every_s=0)
    assert list(quiet) == [0, 1, 2] and capsys.readouterr().err == ""
