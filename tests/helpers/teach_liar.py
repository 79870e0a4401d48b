"""A teacher that lies: ``swarmtrain teach`` with the real weights (so the real digest), the real
server and wire, and wrong answers (every token id shifted by one). The teacher tests start it
as a peer process: ``python tests/helpers/teach_liar.py teach --model ...``."""

from __future__ import annotations

import sys

import peer.node.teacher as teacher_node
from peer.cli.main import entry
from peer.teach.model import TeacherModel


class LyingTeacher(TeacherModel):
    def soft_targets(self, ids):
        top, values = super().soft_targets(ids)
        return (top + 1) % self.vocab, values


if __name__ == "__main__":
    teacher_node.TeacherModel = LyingTeacher
    sys.argv[0] = "swarmtrain"
    entry()
