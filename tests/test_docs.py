"""The documentation: README.md, the pages in docs/ and BENCHMARKS.md.

- every number they quote from a benchmark equals the results file it comes from
  (``scripts/check_numbers.py``);
- the README stays short, starts with the two commands, and its Python example runs (as does
  every Python block in docs/);
- the parameter counts it and docs/architecture.md state are the models' own;
- its command table names every ``coca`` subcommand, and only those;
- every relative link (and ``#anchor``) resolves, every page in docs/ is linked from the README;
- the code map in docs/architecture.md names files that exist, and every tracked module.

Each check is a function of the documents, and each has a test that breaks it on a copy.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import check_numbers  # noqa: E402

ROOT = check_numbers.ROOT
PAGES = ("training.md", "data.md", "evaluation.md", "generation.md", "reliability.md", "performance.md",
         "architecture.md")
README_MAX_LINES = 320


def _copy_documents(dst: Path, root: Path = ROOT) -> Path:
    """README.md, BENCHMARKS.md and docs/*.md copied into ``dst``, with the benchmarks and sources
    linked, so a check can run on an edited copy."""
    (dst / "docs").mkdir(parents=True, exist_ok=True)
    for name in check_numbers.documents(root):
        shutil.copy(root / name, dst / name)
    for name in ("benchmarks", "src", "scripts", "tests", "configs", "Makefile", "constraints.txt", ".ci"):
        if (root / name).exists() and not (dst / name).exists():
            (dst / name).symlink_to(root / name)
    for extra in (root / "docs").iterdir():
        if extra.suffix != ".md":
            shutil.copy(extra, dst / "docs" / extra.name)
    return dst


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


# ---------------------------------------------------------------------------------------------
# Markdown helpers
# ---------------------------------------------------------------------------------------------

_FENCE = re.compile(r"^(```|~~~)")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    out, inside = [], False
    for line in text.splitlines():
        if _FENCE.match(line.strip()):
            inside = not inside
            continue
        if not inside:
            out.append(line)
    return out


def _code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"(?ms)^```{language}\n(.*?)^```", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _prose_lines(text):
        m = re.match(r"^#{1,6} (.+?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def links(text: str) -> list[str]:
    """Link and image targets outside code blocks and inline code."""
    out = []
    for line in _prose_lines(text):
        line = re.sub(r"`[^`]*`", "``", line)
        out += _LINK.findall(line)
    return out


def link_problems(root: Path = ROOT) -> list[str]:
    """Relative links in the documents that point at no file, or at no heading of their file."""
    problems = []
    for name in check_numbers.documents(root):
        source = root / name
        for target in links(source.read_text()):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (source.parent / path).resolve() if path else source
            if not file.exists():
                problems.append(f"{name}: link to {target!r}: no such file")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
                problems.append(f"{name}: link to {target!r}: no heading with that anchor in {file.name}")
    return problems


def unlinked_pages(root: Path = ROOT) -> list[str]:
    """Pages in docs/ the README does not link to."""
    linked = {t.partition("#")[0] for t in links((root / "README.md").read_text())}
    return sorted(p.name for p in (root / "docs").glob("*.md") if f"docs/{p.name}" not in linked)


# ---------------------------------------------------------------------------------------------
# The code map
# ---------------------------------------------------------------------------------------------

def code_map(text: str) -> dict[str, str]:
    """Path -> its section, for the first column of every table under docs/architecture.md's
    "Code map": paths under ``src/coca/``, or from the repository root in "Outside the package"."""
    section = text[text.index("\n## Code map") + 1:]
    end = re.search(r"(?m)^## (?!Code map)", section)
    section = section[:end.start()] if end else section
    out, part = {}, None
    for line in _prose_lines(section):
        if line.startswith("### "):
            part = line[4:].strip()
        m = re.match(r"^\| `([^`]+)` \|", line)
        if m:
            base = "" if part == "Outside the package" else "src/coca/"
            out[base + m.group(1)] = part
    return out


def tracked_modules(root: Path = ROOT) -> list[str]:
    """Every module of the package: git's tracked .py files under src/coca (the filesystem's when
    this is not a git checkout)."""
    try:
        names = subprocess.run(["git", "ls-files", "src/coca"], cwd=root, capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        names = [p.relative_to(root).as_posix() for p in (root / "src/coca").rglob("*.py")]
    return sorted(n for n in names if n.endswith(".py") and (root / n).exists())


def code_map_problems(root: Path = ROOT, modules: list[str] | None = None) -> list[str]:
    entries = code_map((root / "docs/architecture.md").read_text())
    problems = [f"docs/architecture.md: the code map names {p!r}, which does not exist"
                for p in entries if not (root / p.rstrip("/")).exists()]
    covered = set(entries)
    for module in tracked_modules(root) if modules is None else modules:
        if module not in covered and not any(d.endswith("/") and module.startswith(d) for d in covered):
            problems.append(f"docs/architecture.md: the code map does not name {module!r}")
    return problems


# ---------------------------------------------------------------------------------------------
# The command table
# ---------------------------------------------------------------------------------------------

def subcommands() -> set[str]:
    from coca.cli import build_parser
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return set(action.choices)


def command_table(text: str) -> list[str]:
    """The subcommand named in each row of the README's command table."""
    return re.findall(r"(?m)^\| `coca ([a-z]+)[ `]", text)


# ---------------------------------------------------------------------------------------------
# The numbers
# ---------------------------------------------------------------------------------------------

def test_quoted_benchmark_numbers_equal_the_results_files():
    assert check_numbers.check() == []
    assert len(check_numbers.expected()) >= 140  # every results table of BENCHMARKS.md, row by row


def test_every_page_with_numbers_is_checked():
    docs = {doc for doc, *_ in check_numbers.expected()}
    assert {"README.md", "BENCHMARKS.md"} <= docs
    assert {f"docs/{p}" for p in ("training.md", "data.md", "evaluation.md", "generation.md", "reliability.md",
                                  "performance.md")} <= docs
    assert set(check_numbers.documents()) >= docs  # no claim points at a document that is not read


def _claims_by_document():
    first = {}
    for claim in check_numbers.CLAIMS:
        first.setdefault(claim[0], claim)
    return first


def test_a_number_edited_by_hand_is_caught_in_every_document(tmp_path):
    claims = _claims_by_document()
    assert len(claims) >= 6  # the README, BENCHMARKS.md and the pages in docs/ that quote numbers
    for i, (doc, text, results, values) in enumerate(claims.values()):
        files = results if isinstance(results, tuple) else (results,)
        quoted = text.format(*values(*(json.loads((ROOT / "benchmarks/results" / f).read_text()) for f in files)))
        edited = re.sub(r"\d", lambda m: str((int(m.group()) + 1) % 10), quoted, count=1)  # one digit off
        copy = _copy_documents(tmp_path / str(i))
        body = " ".join((copy / doc).read_text().split())  # the claim may be wrapped over lines
        assert quoted in body, (doc, quoted)
        (copy / doc).write_text(body.replace(quoted, edited))
        problems = check_numbers.check(copy)
        assert len(problems) == 1 and problems[0].startswith(f"{doc}:") and quoted in problems[0], problems


def test_a_benchmark_table_row_without_a_results_file_is_caught(tmp_path):
    copy = _copy_documents(tmp_path)
    row = "| greedy, ours (KV cache) | 1 |"
    body = (copy / "BENCHMARKS.md").read_text()
    end = body.index("\n", body.index(row))
    (copy / "BENCHMARKS.md").write_text(body[:end] + "\n| greedy, ours (KV cache) | 64 | 9.999 | 999.9 | **99.9x** |"
                                        + body[end:])
    problems = check_numbers.check(copy)
    assert len(problems) == 1 and "| 64 | 9.999 |" in problems[0] and "not rendered" in problems[0]


def test_a_performance_row_without_a_results_file_is_caught(tmp_path):
    copy = _copy_documents(tmp_path)
    _edit(copy / "docs/performance.md", "| greedy, batch 8 | ", "| greedy, batch 16 | 9.9x |\n| greedy, batch 8 | ")
    problems = check_numbers.check(copy)
    assert problems == ["docs/performance.md: the row '| greedy, batch 16 | 9.9x |' is not rendered from any "
                        "results file"]


def test_a_claim_whose_page_is_gone_is_caught(tmp_path):
    copy = _copy_documents(tmp_path)
    (copy / "docs/evaluation.md").unlink()
    problems = check_numbers.check(copy)
    assert problems and all(p.startswith("docs/evaluation.md: no such document") for p in problems)


# ---------------------------------------------------------------------------------------------
# The README
# ---------------------------------------------------------------------------------------------

def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_the_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[0].startswith("# coca")
    block = lines[lines.index("```bash") + 1:]
    commands = [line.split("#")[0].strip() for line in block[:block.index("```")]]
    assert commands == ["make demo", "make test"]
    assert lines.index("```bash") <= 3  # the first thing after the title
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"(?m)^demo:", makefile) and re.search(r"(?m)^test:", makefile)
    assert "make test" in (ROOT / ".ci/run").read_text()


def test_the_readme_python_example_runs(tmp_path):
    blocks = _code_blocks((ROOT / "README.md").read_text(), "python")
    assert blocks, "the README has no Python example"
    assert len(blocks[0].strip().splitlines()) <= 12
    _run_python(blocks[0], tmp_path)


def test_every_python_block_in_docs_runs(tmp_path):
    blocks = [(p.name, b) for p in sorted((ROOT / "docs").glob("*.md")) for b in _code_blocks(p.read_text(), "python")]
    assert blocks  # docs/architecture.md's API listing at least
    for i, (name, block) in enumerate(blocks):
        (tmp_path / str(i)).mkdir()
        _run_python(block, tmp_path / str(i), name)


def _run_python(code: str, cwd: Path, where: str = "README.md") -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    run = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{where}: " + run.stderr[-3000:]


def test_the_command_table_names_every_subcommand():
    named = command_table((ROOT / "README.md").read_text())
    assert sorted(set(named)) == sorted(subcommands())
    assert len(named) == len(set(named))


def test_the_code_tour_names_seven_files_that_exist():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Where to start reading"):]
    section = section[:section.index("\n## ", 1)]
    files = re.findall(r"(?m)^\| \[`([^`]+)`\]\(([^)]+)\) \|", section)
    assert len(files) == 7
    assert all(name == target and (ROOT / name).is_file() for name, target in files)


def test_the_parameter_counts_are_the_models():
    import coca
    from coca.summary import parameter_counts
    readme = (ROOT / "README.md").read_text()
    arch = (ROOT / "docs/architecture.md").read_text()
    info = arch[arch.index("`coca info coca-large-v2`"):]
    info = info[:info.index("```", info.index("```") + 3)]
    for preset in coca.list_models():
        counts = parameter_counts(coca.create_model(preset, device="meta"))
        for text in (readme, arch):
            row = next(line for line in text.splitlines() if line.startswith(f"| `{preset}` |"))
            assert f"| {counts['total']:,} |" in row, (preset, row)
        if preset == "coca-large-v2":
            assert f"**{counts['total']:,}**" in readme
            for component, n in counts.items():
                assert re.search(rf"(?m)^{component if component != 'total' else 'total'}\s.*\b{n:,}\b", info), component


# ---------------------------------------------------------------------------------------------
# Links and pages
# ---------------------------------------------------------------------------------------------

def test_the_pages_exist_and_are_linked_from_the_readme():
    assert all((ROOT / "docs" / page).is_file() for page in PAGES)
    assert unlinked_pages() == []


def test_every_link_resolves():
    assert link_problems() == []


def test_a_dangling_link_is_caught(tmp_path):
    copy = _copy_documents(tmp_path)
    _edit(copy / "README.md", "## Documentation\n",
          "## Documentation\n\nSee [gone](docs/gone.md) and [the wrong part](docs/data.md#no-such-part).\n")
    _edit(copy / "docs/training.md", "Back to the [README](../README.md)", "Back to the [README](../READ.md)")
    assert link_problems(copy) == [
        "README.md: link to 'docs/gone.md': no such file",
        "README.md: link to 'docs/data.md#no-such-part': no heading with that anchor in data.md",
        "docs/training.md: link to '../READ.md': no such file",
    ]


def test_a_page_the_readme_does_not_link_is_caught(tmp_path):
    copy = _copy_documents(tmp_path)
    (copy / "docs/orphan.md").write_text("# Orphan\n")
    assert unlinked_pages(copy) == ["orphan.md"]


def test_anchors_follow_github():
    assert slug("`coca-large-v2`: the real parameter count") == "coca-large-v2-the-real-parameter-count"
    assert slug("Serving (`coca serve`) and search (`coca index`)") == "serving-coca-serve-and-search-coca-index"
    assert slug("`compile=True`") == "compiletrue"
    assert anchors("# A\n## B\n```\n## not a heading\n```\n## B\n") == {"a", "b", "b-1"}


# ---------------------------------------------------------------------------------------------
# The code map
# ---------------------------------------------------------------------------------------------

def test_the_code_map_matches_the_tree():
    entries = code_map((ROOT / "docs/architecture.md").read_text())
    assert len(entries) >= 50
    assert code_map_problems() == []


def test_a_stale_code_map_is_caught(tmp_path):
    copy = _copy_documents(tmp_path)
    arch = copy / "docs/architecture.md"
    _edit(arch, "| `losses.py` |", "| `gone.py` | a module since removed |\n| `losses.py` |")
    modules = [p for p in code_map(arch.read_text()) if p.endswith(".py") and p != "src/coca/gone.py"]
    modules.append("src/coca/new_module.py")  # a module added to the tree, not to the map
    assert code_map_problems(copy, modules) == [
        "docs/architecture.md: the code map names 'src/coca/gone.py', which does not exist",
        "docs/architecture.md: the code map does not name 'src/coca/new_module.py'",
    ]
