"""pipeline.core.runfolder.foreign_entries: the one rule the CLI (--out) and the batch worker (each
photo's run folder) use before writing into a folder that exists."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.runfolder import foreign_entries


def test_new_empty_and_own_folders_have_nothing_foreign(tmp_path: Path):
    assert foreign_entries(tmp_path / "not-there") == []
    (tmp_path / "empty").mkdir()
    assert foreign_entries(tmp_path / "empty") == []
    own = tmp_path / "own"
    (own / "objects").mkdir(parents=True)
    (own / "run.json").write_text("{}")
    (own / "thesis.doc").write_text("kept: a run folder of ours may hold anything")
    assert foreign_entries(own) == []


def test_a_folder_without_run_json_lists_what_is_not_ours(tmp_path: Path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / ".tmp-scene.ply.1234").write_text("a killed run's temporary")
    assert foreign_entries(folder) == [], "our own temporaries alone do not make a folder foreign"
    (folder / "b.doc").write_text("x")
    (folder / "a.jpg").write_text("x")
    (folder / "demo_scene").mkdir()
    assert foreign_entries(folder) == ["a.jpg", "b.doc", "demo_scene"]
    assert foreign_entries(folder, frozenset({"demo_scene"})) == ["a.jpg", "b.doc"]
