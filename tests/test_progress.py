"""Progress bars show on a terminal only, unless MARNET_PROGRESS says otherwise."""

import io
import sys

import pytest

from marnet.pipeline.core import progress


class _Stderr(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize("setting, tty, shown", [
    (None, True, True), (None, False, False), ("0", True, False), ("1", False, True)])
def test_bars_follow_the_terminal_unless_forced(monkeypatch, setting, tty, shown):
    if setting is None:
        monkeypatch.delenv("MARNET_PROGRESS", raising=False)
    else:
        monkeypatch.setenv("MARNET_PROGRESS", setting)
    monkeypatch.setattr(sys, "stderr", _Stderr(tty))
    assert progress.enabled() is shown
