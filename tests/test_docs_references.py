"""The README's and docs/'s references, as a reader follows them: every relative link opens a
file (and its ``#anchor`` a heading of it), every section a page names in quotes after another
page's name is a heading there, and every ``pytclmilter COMMAND ...`` line the pages show uses
only options that the command's ``--help`` lists.

A renamed file, heading or option leaves the pages pointing at nothing; these catch it.
"""

from __future__ import annotations

import ast
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Iterator

import pytest

from support.tclrun import _pytclmilter_command, child_env

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCED = re.compile(r"^```.*?^```", re.S | re.M)
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z-]+")


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def prose(page: Path) -> str:
    """The page without its code blocks, where a ``#`` line is a comment, not a heading."""
    return FENCED.sub("", page.read_text())


def headings(page: Path) -> list[str]:
    """The page's headings as a reader sees them: no markup, link text only."""
    found = re.findall(r"^#{1,6} +(.*?) *$", prose(page), re.M)
    return [re.sub(r"\[([^]]*)\]\([^)]*\)", r"\1", h).replace("`", "") for h in found]


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of the page's headings: lower case, punctuation but - and _ dropped,
    spaces made -, a repeated one numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for heading in headings(page):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        out.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return out


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_opens_a_file_and_its_anchor_a_heading(page: Path) -> None:
    links = re.findall(r"\]\(([^)\s]+)\)", prose(page))
    broken = []
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue  # (http:, mailto:: not ours to check offline)
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            broken.append(f"{link}: no heading #{anchor} in {target.name}")
    assert not broken, broken


def named_sections(page: Path) -> Iterator[tuple[str, str]]:
    """(page name, section) of each ``PAGE.md`` followed by a quoted section name, as in
    `docs/deployment.md`, "Reloading a script"."""
    text = re.sub(r"\s+", " ", prose(page))
    for m in re.finditer(r"([\w/.-]+\.md)`?\)?,? \"([^\"]+)\"", text):
        yield Path(m.group(1)).name, m.group(2).replace("`", "")


def numbered_off(heading: str) -> str:
    return re.sub(r"^\d+(\.\d+)*\.? ", "", heading)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_section_a_page_names_in_quotes_is_a_heading_of_that_page(page: Path) -> None:
    """A heading may go on past the name ("The greylist's store" names "7. The greylist's
    store: shared by every worker and every host"); it must start with it."""
    by_name = {p.name: p for p in PAGES}
    wrong = []
    for name, section in named_sections(page):
        target = by_name.get(name)
        if target is None:
            wrong.append(f"{name}: no such page")
        elif not any(numbered_off(h).startswith(section) for h in headings(target)):
            wrong.append(f'{name}, "{section}": no such heading')
    assert not wrong, wrong


@cache
def help_options(command: str) -> frozenset[str]:
    done = subprocess.run([*_pytclmilter_command(), command, "--help"], env=child_env(), capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return frozenset(OPTION.findall(done.stdout))


def command_lines(page: Path) -> Iterator[tuple[str, str]]:
    """(command, what follows it up to a lone --) of each ``pytclmilter run|try|send|check`` the
    page shows: in code blocks (continued lines joined, comments cut) and in inline code."""
    text = page.read_text()
    lines = [line.split(" #")[0] for block in FENCED.findall(text)
             for line in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`([^`]+)`", re.sub(r"\s+", " ", prose(page)))
    for line in lines:
        for m in re.finditer(r"(?:^|[\s/;(&|$])pytclmilter (run|try|send|check)\b(.*)", line):
            yield m.group(1), m.group(2).split(" -- ")[0]


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_command_line_shown_uses_options_its_help_lists(page: Path) -> None:
    unknown = [f"pytclmilter {command}{rest}" for command, rest in command_lines(page)
               if set(OPTION.findall(rest)) - help_options(command)]
    assert not unknown, unknown


def test_the_patterns_find_what_the_tests_above_check() -> None:
    """Else those pass on nothing."""
    assert sum(len(re.findall(r"\]\((?!https?:)[^)\s]+\)", prose(page))) for page in PAGES) > 50
    assert sum(1 for page in PAGES for _ in named_sections(page)) > 10
    found = [(page.name, command) for page in PAGES for command, _ in command_lines(page)]
    assert {command for _, command in found} == {"run", "try", "send", "check"}
    assert len(found) > 100, len(found)


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_test_a_page_cites_exists(page: Path) -> None:
    """`test_workers.py::test_a_stop_...` (or a prefix ending in *) names a test the reader can run."""
    cited = re.findall(r"(test_\w+\.py)::(test_\w+)(\*?)", page.read_text())
    missing = []
    for file, name, glob in cited:
        source = ROOT / "tests" / file
        end = "" if glob else r"\b"
        pattern = rf"^(?:async )?def {name}{end}"
        if not source.exists() or not re.search(pattern, source.read_text(), re.M):
            missing.append(f"{file}::{name}{glob}")
    assert not missing, missing


def setup_list_length(name: str) -> int:
    """How many entries setup.py's HOT (or C_EXT) has: what a compiled install compiles."""
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == name:
            return len(ast.literal_eval(node.value))
    raise AssertionError(f"setup.py has no {name}")


def test_the_hot_path_line_the_pages_quote_counts_what_setup_compiles() -> None:
    """deployment.md and troubleshooting.md quote the compiled build's first log line; a module
    added to setup.py's HOT list changes its count."""
    line = f"hot path: compiled with mypyc ({setup_list_length('HOT')} modules) and C ({setup_list_length('C_EXT')})"
    quoted = {page.name: re.findall(r"hot path: compiled with mypyc \(\d+ modules\) and C \(\d+\)", page.read_text())
              for page in PAGES}
    assert {name for name, lines in quoted.items() if lines} == {"deployment.md", "troubleshooting.md"}
    assert all(found == line for lines in quoted.values() for found in lines), (line, quoted)



def first_table_after(text: str, heading: str) -> dict[str, list[str]]:
    """The first table below ``heading``: its first column's text (up to a comma or a
    parenthesis) -> the row's other cells; header and rule rows left out."""
    rest = text[text.index(heading):]
    rows = re.search(r"^\|.*?(?=^[^|])", rest, re.S | re.M)
    assert rows, heading
    cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows.group(0).splitlines()[2:]]
    return {re.split(r"[,(]", row[0])[0].strip(): row[1:] for row in cells}


def test_the_readmes_speed_table_gives_benchmarks_current_figures() -> None:
    """README's messages a second are docs/benchmarks.md's "Current figures", and its ratios
    those figures' quotients (to 0.01: benchmarks.md's ratios are medians of each round's)."""
    readme = first_table_after((ROOT / "README.md").read_text(), "## Speed")
    current = first_table_after((ROOT / "docs" / "benchmarks.md").read_text(), "## Current figures")
    figures = {}
    for name in ("null milter", "libmilter", "pymilter", "pytclmilter"):
        one, hundred = (int(cell.split()[0]) for cell in readme[name])
        assert (one, hundred) == (int(current[name][0]), int(current[name][2])), (name, readme[name], current[name])
        figures[name.split()[0]] = (one, hundred)
    for column, cell in enumerate(readme["pytclmilter"]):
        ratios = re.findall(r"([\d.]+) × (null|pymilter|libmilter)", cell)
        assert ratios, cell
        for ratio, other in ratios:
            assert abs(float(ratio) - figures["pytclmilter"][column] / figures[other][column]) < 0.011, (cell, other)
