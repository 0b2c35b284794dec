"""The numbers README.md and BENCHMARKS.md quote from benchmarks equal the benchmarks' results."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import check_numbers  # noqa: E402


def test_quoted_benchmark_numbers_equal_the_results_files():
    assert check_numbers.check() == []
    assert len(check_numbers.expected()) >= 140  # every results table of BENCHMARKS.md, row by row


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


def test_a_benchmark_table_row_without_a_results_file_is_caught(tmp_path):
    for name in ("README.md", "BENCHMARKS.md"):
        (tmp_path / name).write_text((check_numbers.ROOT / name).read_text())
    body = (tmp_path / "BENCHMARKS.md").read_text()
    row = "| greedy, ours (KV cache) | 1 |"
    at = body.index(row)
    end = body.index("\n", at)
    (tmp_path / "BENCHMARKS.md").write_text(body[:end] + "\n| greedy, ours (KV cache) | 64 | 9.999 | 999.9 | **99.9x** |" + body[end:])
    (tmp_path / "benchmarks").symlink_to(check_numbers.ROOT / "benchmarks")
    problems = check_numbers.check(tmp_path)
    assert len(problems) == 1 and "| 64 | 9.999 |" in problems[0] and "not rendered" in problems[0]
