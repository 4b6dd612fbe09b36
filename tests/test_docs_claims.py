"""Every test the documentation names exists, and every link stays inside the repository.

README.md and docs/*.md prove each security claim by naming a test
(``tests/<file>.py::<function>``; a bare ``test_<name>`` in backticks must be
a test function somewhere under tests/). A claim whose test was renamed or
deleted would silently lose its proof, so this check fails on any reference
whose file or function does not exist. Test files are parsed with ``ast``,
never imported. Links must not leave the repository (a clone has nothing
beside it) and relative links must point at files that exist.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# tests/<path>.py, optionally ::<function> (or ::<Class>::<method>), optionally [param-id].
FULL_REFERENCE = re.compile(r"(?<![\w/.-])(tests/[\w/]+\.py)((?:::\w+)*)")
# `::test_name` with no file in front: ambiguous, the docs always name the file.
ORPHAN_REFERENCE = re.compile(r"(?<![\w.])::test_\w+")
# `test_name` alone in backticks: must be a test function somewhere under tests/.
BARE_TEST_NAME = re.compile(r"`(test_\w+)`")
# Markdown links and images: [text](target) — the target up to a space or ')'.
MARKDOWN_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
# A path written out in text that climbs out of its folder: ../something.
PARENT_PATH = re.compile(r"(?<![\w.:/])\.\./[\w./-]+")
EXTERNAL_SCHEMES = ("http://", "https://", "mailto:")


@dataclass
class DefinedTests:
    """The test functions (and class methods) of each test file, read with ast."""

    root: Path
    _names: dict[Path, set[str]] = field(default_factory=dict)

    def names_in(self, relative: str) -> set[str] | None:
        """Qualified names defined in ``relative`` (``f``, ``Class``, ``Class::m``), or None."""
        path = (self.root / relative).resolve()
        if path in self._names:
            return self._names[path]
        if not path.is_file() or not path.is_relative_to(self.root):
            return None
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        names: set[str] = set()
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(node.name)
            elif isinstance(node, ast.ClassDef):
                names.add(node.name)
                for item in node.body:
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                        names.add(f"{node.name}::{item.name}")
        self._names[path] = names
        return names

    def all_test_functions(self) -> set[str]:
        found: set[str] = set()
        for path in sorted((self.root / "tests").rglob("test_*.py")):
            names = self.names_in(str(path.relative_to(self.root))) or set()
            found |= {name.rsplit("::", 1)[-1] for name in names}
        return found


def _strip_code_blocks(text: str) -> str:
    """Blank out fenced code blocks (shell examples are not references or links)."""
    return re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)


def anchors(markdown: Path) -> set[str]:
    """The heading anchors GitHub gives a Markdown file (lower case, punctuation dropped)."""
    seen: dict[str, int] = {}
    for line in _strip_code_blocks(markdown.read_text(encoding="utf-8")).splitlines():
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading is None:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def check_document(doc: Path, root: Path, index: DefinedTests) -> list[str]:
    """Problems found in one Markdown file, each as ``file:line: message``."""
    problems: list[str] = []
    text = doc.read_text(encoding="utf-8")
    prose = _strip_code_blocks(text)
    label = doc.relative_to(root) if doc.is_relative_to(root) else doc
    bare_names: set[str] | None = None
    for number, line in enumerate(prose.splitlines(), start=1):
        where = f"{label}:{number}"
        for match in FULL_REFERENCE.finditer(line):
            file, functions = match.group(1), match.group(2)
            names = index.names_in(file)
            if names is None:
                problems.append(f"{where}: {file} does not exist")
                continue
            qualified = functions.removeprefix("::")
            if qualified and qualified not in names:
                problems.append(f"{where}: {file}::{qualified} does not exist")
        for match in ORPHAN_REFERENCE.finditer(line):
            problems.append(f"{where}: {match.group(0)} names no file (write tests/<file>.py::…)")
        for match in BARE_TEST_NAME.finditer(line):
            if bare_names is None:
                bare_names = index.all_test_functions()
            if match.group(1) not in bare_names:
                problems.append(f"{where}: no test function {match.group(1)} under tests/")
        for match in MARKDOWN_LINK.finditer(line):
            target = match.group(1)
            if target.startswith(EXTERNAL_SCHEMES):
                continue
            path_part = target.split("#", 1)[0] or doc.name
            if path_part.startswith("/") or re.match(r"^[a-z][a-z0-9+.-]*:", path_part):
                problems.append(f"{where}: link {target} is not a path inside the repository")
                continue
            resolved = (doc.parent / path_part).resolve()
            if not resolved.is_relative_to(root):
                problems.append(f"{where}: link {target} leaves the repository")
            elif not resolved.exists():
                problems.append(f"{where}: link {target} points at nothing")
            elif (
                "#" in target
                and resolved.suffix == ".md"
                and target.split("#", 1)[1] not in anchors(resolved)
            ):
                problems.append(f"{where}: link {target} names no heading of that page")
        for match in PARENT_PATH.finditer(MARKDOWN_LINK.sub("", line)):
            resolved = (doc.parent / match.group(0)).resolve()
            if not resolved.is_relative_to(root):
                problems.append(f"{where}: {match.group(0)} is outside the repository")
    return problems


def documents(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def test_every_test_the_docs_name_exists_and_every_link_stays_inside() -> None:
    index = DefinedTests(ROOT)
    problems = [p for doc in documents(ROOT) for p in check_document(doc, ROOT, index)]
    assert not problems, "\n".join(problems)


def test_the_docs_name_tests_at_all() -> None:
    """The check above is not vacuous: the docs really cite tests (and the README too)."""
    cited = {
        doc.name: len(FULL_REFERENCE.findall(_strip_code_blocks(doc.read_text(encoding="utf-8"))))
        for doc in documents(ROOT)
    }
    assert cited["README.md"] >= 10, cited
    assert sum(cited.values()) >= 500, cited


# -- the checker itself, on planted documents ------------------------------------------


def _planted(tmp_path: Path, markdown: str) -> list[str]:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_real.py").write_text(
        "def test_exists():\n    pass\n\n\nclass TestGroup:\n    def test_method(self):\n"
        "        pass\n"
    )
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## Webhooks, exactly once\n")
    doc = tmp_path / "docs" / "page.md"
    doc.write_text(markdown)
    return check_document(doc, tmp_path, DefinedTests(tmp_path))


def test_the_checker_accepts_real_references_and_links(tmp_path: Path) -> None:
    problems = _planted(
        tmp_path,
        "Proved by `tests/test_real.py::test_exists`, `tests/test_real.py::TestGroup::"
        "test_method`, `tests/test_real.py` and `test_exists`.\n"
        "See [other](other.md#webhooks-exactly-once), [the readme](../docs/other.md), "
        "[web](https://example.org).\n"
        "```sh\nbastion ../elsewhere tests/test_gone.py::test_x\n```\n",
    )
    assert problems == []


def test_the_checker_fails_on_a_missing_test_function(tmp_path: Path) -> None:
    problems = _planted(tmp_path, "Proved by `tests/test_real.py::test_renamed_away`.\n")
    assert problems == ["docs/page.md:1: tests/test_real.py::test_renamed_away does not exist"]


def test_the_checker_fails_on_a_missing_test_file(tmp_path: Path) -> None:
    problems = _planted(tmp_path, "Proved by tests/test_gone.py::test_exists.\n")
    assert problems == ["docs/page.md:1: tests/test_gone.py does not exist"]


def test_the_checker_fails_on_a_bare_or_orphan_name_that_proves_nothing(tmp_path: Path) -> None:
    problems = _planted(tmp_path, "Held by `test_nowhere` and `::test_exists`.\n")
    assert problems == [
        "docs/page.md:1: ::test_exists names no file (write tests/<file>.py::…)",
        "docs/page.md:1: no test function test_nowhere under tests/",
    ]


def test_the_checker_fails_on_links_outside_the_repository_or_to_nothing(tmp_path: Path) -> None:
    problems = _planted(
        tmp_path,
        "See [design](../../shared/DESIGN.md), [abs](/etc/passwd), [gone](missing.md).\n"
        "Also ../../shared/CHECKLIST.md in text, and [a heading](other.md#webhooks).\n",
    )
    assert problems == [
        "docs/page.md:1: link ../../shared/DESIGN.md leaves the repository",
        "docs/page.md:1: link /etc/passwd is not a path inside the repository",
        "docs/page.md:1: link missing.md points at nothing",
        "docs/page.md:2: link other.md#webhooks names no heading of that page",
        "docs/page.md:2: ../../shared/CHECKLIST.md is outside the repository",
    ]
