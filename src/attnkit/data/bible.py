"""The King James Bible as an offline English corpus (Debian's ``bible-kjv-text``).

It is the one sizeable English text that installs from a package registry on a machine with no
hub access: ``apt-get install bible-kjv-text`` and then ``bible -f gen1:1-rev22:21`` prints all
31,102 verses, one a line, each prefixed by a reference such as ``Ge1:1``.

Documents are chapters (1,189 of them), verses joined by newlines, references removed. The
split is by whole chapters so that no held-out verse has its neighbours in the training data:
walking the chapters in canonical order, chapter ``k`` goes to validation when
``k % 20 == 9``, to test when ``k % 20 == 19``, and to train otherwise (90 / 5 / 5, spread evenly
over every part of the book, so each split has law, history, poetry, prophecy and letters).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache

from attnkit.errors import UserError

BIBLE_COMMAND = ["bible", "-f", "gen1:1-rev22:21"]
INSTALL_HINT = "install it with: apt-get install bible-kjv-text (Debian/Ubuntu)"
HOLDOUT_PERIOD = 20  # one chapter in 20 to validation, one in 20 to test
VALIDATION_SLOT = 9
TEST_SLOT = 19
EXPECTED_VERSES = 31_102

_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


@dataclass(frozen=True)
class Verse:
    book: str  # the abbreviation ``bible`` prints: Ge, Exo, ..., Rev
    chapter: int
    verse: int
    text: str


@dataclass(frozen=True)
class Chapter:
    index: int  # 0..1188 in canonical order
    book: str
    chapter: int
    verses: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.verses)

    @property
    def split(self) -> str:
        return chapter_split(self.index)


def chapter_split(index: int) -> str:
    """The split of the chapter with this canonical index: the one rule the whole split rests on."""
    slot = index % HOLDOUT_PERIOD
    if slot == VALIDATION_SLOT:
        return "validation"
    if slot == TEST_SLOT:
        return "test"
    return "train"


def _run_bible() -> str:
    if shutil.which(BIBLE_COMMAND[0]) is None:
        raise UserError(f"the 'kjv' corpus needs the 'bible' command from bible-kjv-text; {INSTALL_HINT}")
    try:
        done = subprocess.run(BIBLE_COMMAND, capture_output=True, text=True, check=True, timeout=120)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        raise UserError(f"running '{' '.join(BIBLE_COMMAND)}' failed ({e}); {INSTALL_HINT}") from e
    return done.stdout


def parse_verses(raw: str) -> list[Verse]:
    """Parse ``bible -f`` output; every non-empty line must be ``<Book><chapter>:<verse> <text>``."""
    verses = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        m = _VERSE.match(line)
        if m is None:
            raise UserError(f"unexpected line {n} in the output of '{' '.join(BIBLE_COMMAND)}': {line[:60]!r}")
        verses.append(Verse(m.group(1), int(m.group(2)), int(m.group(3)), m.group(4).strip()))
    return verses


@lru_cache(maxsize=1)
def load_chapters() -> tuple[Chapter, ...]:
    """All 1,189 chapters in canonical order (cached: the text never changes)."""
    verses = parse_verses(_run_bible())
    if len(verses) != EXPECTED_VERSES:
        # A different edition would silently move the split; refuse rather than drift.
        raise UserError(f"expected {EXPECTED_VERSES} KJV verses from bible-kjv-text, got {len(verses)}")
    chapters: list[Chapter] = []
    current: list[str] = []
    key: tuple[str, int] | None = None
    for v in verses:
        if (v.book, v.chapter) != key:
            if key is not None:
                chapters.append(Chapter(len(chapters), key[0], key[1], tuple(current)))
            key, current = (v.book, v.chapter), []
        current.append(v.text)
    assert key is not None
    chapters.append(Chapter(len(chapters), key[0], key[1], tuple(current)))
    return tuple(chapters)


def kjv_splits() -> dict[str, list[str]]:
    """``{"train": [...], "validation": [...], "test": [...]}``, each a list of chapter texts."""
    splits: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for ch in load_chapters():
        splits[ch.split].append(ch.text)
    return splits
