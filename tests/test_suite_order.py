"""The suite's own ordering (``conftest.LONGEST``) names tests that exist: a renamed
test would otherwise drop out of the list silently and start late again."""

from __future__ import annotations

import re

from conftest import LONGEST, REPO


def test_the_longest_tests_listed_first_exist():
    for nodeid in LONGEST:
        path, name = nodeid.split("::")
        source = (REPO / path).read_text(encoding="utf-8")
        assert re.search(rf"^def {re.escape(name)}\(", source, re.M), nodeid
