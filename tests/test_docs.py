"""The numbers README.md and BENCHMARKS.md quote from benchmarks equal the benchmarks' results."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import check_numbers  # noqa: E402


def test_quoted_benchmark_numbers_equal_the_results_files():
    assert check_numbers.check() == []
    assert len(check_numbers.CLAIMS) >= 25


def test_a_number_edited_by_hand_is_caught(tmp_path):
    import json
    import re
    doc, text, results, values = check_numbers.CLAIMS[0]
    quoted = text.format(*values(json.loads((check_numbers.ROOT / "benchmarks/results" / results).read_text())))
    edited = re.sub(r"\d", lambda m: str((int(m.group()) + 1) % 10), quoted, count=1)  # one digit off
    for name in ("README.md", "BENCHMARKS.md"):
        body = " ".join((check_numbers.ROOT / name).read_text().split())
        (tmp_path / name).write_text(body.replace(quoted, edited) if name == doc else body)
    (tmp_path / "benchmarks").symlink_to(check_numbers.ROOT / "benchmarks")
    problems = check_numbers.check(tmp_path)
    assert len(problems) == 1 and quoted in problems[0]
