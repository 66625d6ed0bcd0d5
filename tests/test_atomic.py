"""atomic_folder: complete or absent, replace or keep-first, nothing left behind on error."""

from __future__ import annotations

import pytest

from llmtune.atomic import atomic_folder


def test_replace_swaps_the_whole_folder(tmp_path):
    target = tmp_path / "out"
    with atomic_folder(target) as staging:
        (staging / "a.txt").write_text("1")
    with atomic_folder(target) as staging:
        (staging / "b.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging or old copies left


def test_keep_first_leaves_a_finished_target_alone(tmp_path):
    target = tmp_path / "cache"
    with atomic_folder(target, replace=False) as staging:
        (staging / "first").write_text("")
    with atomic_folder(target, replace=False) as staging:
        (staging / "second").write_text("")
    assert [p.name for p in target.iterdir()] == ["first"]


def test_an_error_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "out") as staging:
        (staging / "half").write_text("")
        raise RuntimeError("killed half way")
    assert list(tmp_path.iterdir()) == []
