"""``snapyard demo`` is part of ``make test``: the story it tells must stay true."""

from __future__ import annotations

import io

import pytest

from actors.cli import main
from actors.demo import DEMO_LABELS
from actors.engine.base import Engine

pytestmark = [pytest.mark.docker, pytest.mark.slow]


def test_demo_tells_the_whole_story_and_cleans_up(docker_engine: Engine, base_image: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = main(["demo"], out=out, err=err)
    text = out.getvalue()
    assert code == 0, text + err.getvalue()
    lines = text.splitlines()
    assert lines[0].startswith("Snapyard demo on ")
    assert lines[1].startswith("1. first run of snapyard-demo/item-")
    assert "on the base image, setup paid; snapshot " in lines[1]
    assert lines[1].endswith(" committed")
    assert lines[2].startswith("2. second run: succeeded in ")
    assert "setup skipped" in lines[2]
    assert lines[3].startswith("3. snapshot image ")
    assert "deleted behind the supervisor's back" in lines[3]
    assert lines[4].startswith("4. next run: succeeded in ")
    assert "recovered on the base image with no user action" in lines[4]
    assert lines[5].startswith("5. run after it: succeeded in ")
    assert "from a fresh snapshot" in lines[5]
    assert lines[6].startswith("demo ok: every step behaved")
    assert "!!" not in text
    assert docker_engine.list_containers(DEMO_LABELS) == []
    assert docker_engine.list_images(DEMO_LABELS) == []
