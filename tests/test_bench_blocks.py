"""bench/results.py: each benchmark run replaces only its own marked block of BENCHMARKS.md, so two runs
of one script under different block names (bench_sparse.py --block) keep each other's results."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from results import markers, write_block  # noqa: E402


def _block(name: str, body: str) -> str:
    start, end = markers(name)
    return f"{start}\n{body}\n{end}"


def test_two_blocks_replace_only_their_own(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n## Sparse\n\nlead\n\n" + _block("a", "old a") + "\n\nbetween\n\n"
                    + _block("b", "old b") + "\n\ntail\n")
    write_block(path, "b", _block("b", "new b"))
    write_block(path, "a", _block("a", "new a\nrows"))
    expected = ("# Benchmarks\n\n## Sparse\n\nlead\n\n" + _block("a", "new a\nrows") + "\n\nbetween\n\n"
                + _block("b", "new b") + "\n\ntail\n")
    assert path.read_text() == expected


def test_a_missing_block_is_appended_after_its_heading(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n" + _block("a", "x") + "\n")
    write_block(path, "c", _block("c", "y"), "## C")
    assert path.read_text() == "# Benchmarks\n\n" + _block("a", "x") + "\n\n## C\n\n" + _block("c", "y") + "\n"
