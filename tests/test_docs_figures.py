"""Every memory or step-time figure in README.md and docs/performance.md names where it comes from.

A figure (a number with GiB, GB, MiB, MB or seconds a step) must have a commit hash or a path under
``benchmarks/results/`` (the committed record, or the commit whose code, planner or benchmark, produced it; issue #14,
"Figures with a source") in its paragraph or, in a table, in its row, the table's header or the paragraph just above
the table (its caption). The paragraph, not the line: prose is wrapped, and a rule that a reflow could break would
test the wrapping. README's demo section is left out: its figures are the demo's (``benchmarks/results/demo_targets.md``). Targets (``<= 24 GiB``), hardware names (``H100 80GB``) and card sizes
(``a 24 GB GPU``) are not figures. Fast: reads two files, loads no models.
"""

import re
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "docs/performance.md"]
SKIPPED_SECTIONS = {"README.md": ["## The demo"]}

FIGURE = re.compile(r"(?<![\w.])(?P<num>\d+(?:\.\d+)?)\s?(?P<unit>GiB|GB|MiB|MB|s/step|s a step|s per step)(?![\w/])")
# what is not a measured figure: a target or bound, a GPU's or card's size, a hardware name
NOT_A_FIGURE = re.compile(
    r"(?:<=|≤|<|>=|≥|within|under)\s*$"  # "<= 24 GiB", "under 16 GiB": a target or bound
)
CARD_AFTER = re.compile(r"^\s*(?:GPU|card|VRAM|HBM3)\b")
HARDWARE_BEFORE = re.compile(r"(?:H100|H200|A100|A10G|L4|RTX \w+)\s+$")
HASH = re.compile(r"(?<![\w/.])[0-9a-f]{7,40}(?![\w/])")
RESULTS = re.compile(r"(?:benchmarks/)?results/[\w./{},*-]+")


def is_commit_hash(token: str) -> bool:
    return bool(re.search(r"[a-f]", token) and re.search(r"[0-9]", token))


def sources_in(text: str) -> set[str]:
    """The commit hashes and record paths a piece of text names."""
    found = {m.group(0) for m in RESULTS.finditer(text)}
    found |= {m.group(0) for m in HASH.finditer(text) if is_commit_hash(m.group(0))}
    return found


def figures_in(line: str) -> list[str]:
    out = []
    for m in FIGURE.finditer(line):
        before, after = line[: m.start()], line[m.end() :]
        if NOT_A_FIGURE.search(before[-12:]) or HARDWARE_BEFORE.search(before) or CARD_AFTER.match(after):
            continue
        out.append(m.group(0))
    return out


def paragraph(lines: list[str], i: int) -> str:
    """The run of non-blank prose lines around line i (tables, headings and fences end it)."""

    def prose(j):
        return lines[j].strip() and not lines[j].lstrip().startswith(("|", "#", "```"))

    lo, hi = i, i
    while lo > 0 and prose(lo - 1):
        lo -= 1
    while hi + 1 < len(lines) and prose(hi + 1):
        hi += 1
    return "\n".join(lines[lo : hi + 1])


def doc_lines(path: Path, skipped: list[str] = ()):
    """(line number, line, context) for each line outside code fences and skipped sections; context is the
    line's paragraph, or for a table row the row, the table's header and the paragraph just above the table."""
    lines = path.read_text(encoding="utf-8").splitlines()
    fenced = skipping = False
    table_context = ""
    for i, line in enumerate(lines):
        if line.startswith("#") and not fenced:
            skipping = line.strip() in skipped
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced or skipping:
            continue
        if line.lstrip().startswith("|"):
            if i == 0 or not lines[i - 1].lstrip().startswith("|"):  # a table starts: its caption and header
                j = i - 1
                while j >= 0 and not lines[j].strip():
                    j -= 1
                caption = []
                while j >= 0 and lines[j].strip() and not lines[j].lstrip().startswith(("|", "#", "```")):
                    caption.append(lines[j])
                    j -= 1
                table_context = "\n".join(reversed(caption)) + "\n" + line
            yield i + 1, line, line + "\n" + table_context
        else:
            yield i + 1, line, paragraph(lines, i)


@pytest.mark.parametrize("doc", DOCS)
def test_every_figure_names_its_record_or_commit(doc):
    missing = [
        f"{doc}:{n}: {', '.join(figs)}: {line.strip()[:100]}"
        for n, line, context in doc_lines(ROOT / doc, SKIPPED_SECTIONS.get(doc, []))
        if (figs := figures_in(line)) and not sources_in(context)
    ]
    assert not missing, "figures without a commit or a benchmarks/results record:\n" + "\n".join(missing)


def test_the_rule_reads_figures_and_sources_as_meant():
    assert figures_in("| SDXL 1024 | <= 24 GiB | **22.05 GiB**; 7.59 s/step |") == ["22.05 GiB", "7.59 s/step"]
    assert figures_in("for one 24 GB GPU, on an NVIDIA H100 80GB, a 16 GB card") == []
    assert figures_in("the lock is taken over; the step runs twice") == []  # prose without figures
    assert figures_in("peaked at a 22.05 GiB high, < 24 GiB") == ["22.05 GiB"]
    assert sources_in("at commit `737d888`, see `benchmarks/results/cpu_tiny.md`") == {
        "737d888",
        "benchmarks/results/cpu_tiny.md",
    }
    assert sources_in("1234567 steps, a decade, facade") == set()  # digits alone or words are not hashes
    rows = list(doc_lines_from("caption at `38ad13a`:\n\n| a | b |\n| --- | --- |\n| 1 GiB | 2 GiB |\n"))
    assert [n for n, line, ctx in rows if figures_in(line) and sources_in(ctx)] == [5]
    prose = list(doc_lines_from("measured at `38ad13a`\nwrapped: 1.5 GiB\n\nanother paragraph: 2 GiB\n"))
    assert [n for n, line, ctx in prose if figures_in(line) and not sources_in(ctx)] == [4]


def doc_lines_from(text: str):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "x.md"
        p.write_text(text, encoding="utf-8")
        yield from list(doc_lines(p))


def test_cited_commits_exist():
    """Every hash the two documents cite is a commit of this repository (skipped outside a full git clone)."""
    try:
        shallow = subprocess.run(
            ["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    if shallow != "false":
        pytest.skip("shallow clone: older commits are absent")
    cited = set()
    for doc in DOCS:
        for m in HASH.finditer((ROOT / doc).read_text(encoding="utf-8")):
            if is_commit_hash(m.group(0)):
                cited.add(m.group(0))
    unknown = [
        h
        for h in sorted(cited)
        if subprocess.run(["git", "cat-file", "-e", f"{h}^{{commit}}"], cwd=ROOT, capture_output=True).returncode
    ]
    assert not unknown, f"cited hashes that are not commits here: {unknown}"
