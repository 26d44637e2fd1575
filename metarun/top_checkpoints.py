"""eval.ensemble_top_k's members: the K best validations of a run so far, best first, each as
{"step", "score"}, with its weights in checkpoints/top-step<step>.pt (metarun.run_dir) and the
list itself in last.pt's "top_k".

A member's file is written before last.pt lists it, and a file is removed only once last.pt no
longer lists it (`remove_unlisted`), so a kill at any moment leaves every member that last.pt names
on disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from metarun import run_dir as files
from metarun.checkpoint import save_checkpoint
from metarun.score import Score


class TopCheckpoints:
    def __init__(self, run_dir: Path, k: int, score: Score, writes: bool = True) -> None:
        self.run_dir, self.k, self.score = run_dir, k, score
        self.writes = writes  # rank 0 alone writes and removes files
        self.members: list[dict[str, Any]] = []
        self.listed: set[int] = set()  # the members' steps that last.pt lists

    def file(self, member: dict[str, Any]) -> Path:
        return files.ensemble_member_file(self.run_dir, member["step"])

    def ranked(self, members: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Best score first (the score's own direction); of equal scores the earlier step first,
        as best.pt keeps the first of equal validations."""
        return sorted(members, key=lambda m: (-self.score.objective(m["score"]), m["step"]))

    def enter(self, step: int, score: float, checkpoint: Callable[[], dict[str, Any]]) -> None:
        """Write `checkpoint()` as the member of the validation at `step` when it ranks among the K
        best so far; the one it pushes out stays on disk until last.pt stops listing it."""
        if self.k == 1:
            return
        entry = {"step": step, "score": score}
        ranked = self.ranked([*self.members, entry])[: self.k]
        if entry not in ranked:
            return
        self.members = ranked
        if self.writes:
            save_checkpoint(checkpoint(), self.file(entry))

    def saved(self) -> list[dict[str, Any]]:
        """The list last.pt keeps, called as last.pt is written: from then on it names these."""
        self.listed = {member["step"] for member in self.members}
        return self.members

    def resume(self, listed: list[dict[str, Any]]) -> None:
        """The members that a resumed run's last.pt lists; eval.ensemble_top_k may change on resume,
        and a smaller K keeps the best of them."""
        self.listed = {member["step"] for member in listed}
        self.members = [dict(member) for member in listed[: self.k]] if self.k > 1 else []

    def remove_unlisted(self) -> None:
        """Remove the member files that last.pt does not list: those fallen out of the K best, and
        one written by a start killed before last.pt listed it."""
        if not self.writes:
            return
        for step, path in files.ensemble_member_files(self.run_dir).items():
            if step not in self.listed:
                path.unlink(missing_ok=True)

    def rescore(self, validate: Callable[[Path], dict[str, Any]]) -> None:
        """Score each member again with `validate(its file) -> validation record` (new validation
        episodes on resume), rewrite its file with that record, and rank them again."""
        for member in self.members:
            val = validate(self.file(member))
            member["score"] = val[self.score.name]
        self.members = self.ranked(self.members)

    def entry(self) -> dict[str, Any]:
        """results.json's record of the ensemble tested."""
        return files.ensemble_entry(self.run_dir, self.k, self.members, self.score)
