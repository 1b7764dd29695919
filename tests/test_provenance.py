"""A result file says which commit made it, or that this is unknown; finding out never stops the run."""
import subprocess

from controlnet_lab import provenance


def test_the_commit_is_unknown_outside_a_repository_or_without_git(tmp_path, monkeypatch):
    assert len(provenance.commit()["commit"]) == 40
    monkeypatch.setattr(provenance, "ROOT", tmp_path)
    assert provenance.commit() == {"commit": None, "uncommitted_changes": None}

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert provenance.commit() == {"commit": None, "uncommitted_changes": None}
