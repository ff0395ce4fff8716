"""The King James Bible as an offline English corpus, shipped with attnkit.

The text (public domain) is the output of Debian's ``bible-kjv-text`` 4.38,
``bible -f gen1:1-rev22:21``: all 31,102 verses, one a line, each prefixed by a reference such
as ``Ge1:1``. It ships xz-compressed in ``kjv.txt.xz`` (0.98 MB; 4.4 MB unpacked) so that the
``kjv`` corpus, the reference model's reproduction and the tests work on every OS. When that
file is missing (a stripped install), Debian's ``bible`` command is used instead; a test checks
that both give the same verses and splits.

Documents are chapters (1,189 of them), verses joined by newlines, references removed. The
split is by whole chapters so that no held-out verse has its neighbours in the training data:
walking the chapters in canonical order, chapter ``k`` goes to validation when
``k % 20 == 9``, to test when ``k % 20 == 19``, and to train otherwise (90 / 5 / 5, spread evenly
over every part of the book, so each split has law, history, poetry, prophecy and letters).
"""

from __future__ import annotations

import hashlib
import lzma
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from attnkit.errors import UserError

BIBLE_COMMAND = ["bible", "-f", "gen1:1-rev22:21"]
INSTALL_HINT = "install it with: apt-get install bible-kjv-text (Debian/Ubuntu)"
HOLDOUT_PERIOD = 20  # one chapter in 20 to validation, one in 20 to test
VALIDATION_SLOT = 9
TEST_SLOT = 19
EXPECTED_VERSES = 31_102
SHIPPED_TEXT = Path(__file__).with_name("kjv.txt.xz")
# sha256 of the unpacked shipped text: a damaged file is refused rather than moving the split.
SHIPPED_SHA256 = "cd45f0c9cedab8e4439bd6486c8952c77cc8b0ecc5d1f6ae3513f2039f47229d"

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


def kjv_available() -> bool:
    """True when the text can be had without error: the shipped file or Debian's ``bible`` command."""
    return SHIPPED_TEXT.is_file() or shutil.which(BIBLE_COMMAND[0]) is not None


def kjv_source() -> str:
    """Where ``load_chapters`` reads the text from: ``"shipped"`` or ``"bible-kjv-text"``."""
    return "shipped" if SHIPPED_TEXT.is_file() else "bible-kjv-text"


def read_shipped_text(path: Path = SHIPPED_TEXT) -> str:
    """The shipped ``bible -f`` output, checked against its sha256."""
    try:
        data = lzma.decompress(path.read_bytes())
    except (OSError, lzma.LZMAError) as e:
        raise UserError(f"the shipped King James text {path} cannot be read ({e}); reinstall attnkit") from e
    if hashlib.sha256(data).hexdigest() != SHIPPED_SHA256:
        raise UserError(f"the shipped King James text {path} is damaged (checksum mismatch); reinstall attnkit")
    return data.decode("utf-8")


def raw_text() -> str:
    """The ``bible -f`` text: the shipped copy, else Debian's ``bible`` command."""
    return read_shipped_text() if SHIPPED_TEXT.is_file() else run_bible()


def run_bible() -> str:
    """The output of Debian's ``bible -f gen1:1-rev22:21``."""
    if shutil.which(BIBLE_COMMAND[0]) is None:
        raise UserError(
            f"the 'kjv' corpus text is missing: neither the shipped {SHIPPED_TEXT.name} nor the 'bible' command "
            f"from bible-kjv-text is there; reinstall attnkit or {INSTALL_HINT}"
        )
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
    return chapters_from_text(raw_text())


def chapters_from_text(raw: str) -> tuple[Chapter, ...]:
    """Chapters in canonical order from ``bible -f`` text (shipped or Debian's)."""
    verses = parse_verses(raw)
    if len(verses) != EXPECTED_VERSES:
        # A different edition would silently move the split; refuse rather than drift.
        raise UserError(f"expected {EXPECTED_VERSES} KJV verses, got {len(verses)}")
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
