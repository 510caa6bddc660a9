"""Every "§" reference in the code, the tests and the Markdown resolves to a numbered heading
of the reference documents in docs/ (methods, design, datasets)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("methods", "design", "datasets")
NUMBER = r"\d+(?:\.\d+)*"
# "methods §3.14", "datasets §1, §5", "methods §2.3-2.4", "[methods §4](docs/methods.md)"
CITATION = re.compile(rf"\b({'|'.join(DOCS)})(?:\.md)? (§{NUMBER}(?:-{NUMBER})?"
                      rf"(?:(?:, | and )§{NUMBER}(?:-{NUMBER})?)*)")
SECTION = re.compile(rf"§({NUMBER})(?:-({NUMBER}))?")
HEADING = re.compile(rf"^#+ ({NUMBER})\.? ", re.M)


def headings(doc: str) -> set[str]:
    """The section numbers of docs/<doc>.md ("## 3. ..." -> "3", "### 3.14 ..." -> "3.14")."""
    return set(HEADING.findall((ROOT / "docs" / f"{doc}.md").read_text(encoding="utf-8")))


def sources() -> list[Path]:
    code = [ROOT / "cli.py", *sorted((ROOT / "pipeline").rglob("*.py")),
            *sorted(p for p in (ROOT / "tests").rglob("*.py") if p.name != "test_docs.py")]
    return [*code, ROOT / "README.md", ROOT / "BENCHMARKS.md",
            *sorted((ROOT / "docs").glob("*.md"))]


def citations(text: str, own_doc: str | None) -> tuple[list[tuple[str, str]], int]:
    """``(doc, number)`` of every cited section and the count of "§" signs left unexplained
    (a "§" outside a citation; inside docs/<own_doc>.md a bare "§N" cites that document)."""
    found, covered = [], set()
    for match in CITATION.finditer(text):
        for section in SECTION.finditer(match.group(2)):
            found += [(match.group(1), n) for n in section.groups() if n]
        covered.update(range(match.start(2), match.end(2)))
    stray = 0
    for section in SECTION.finditer(text):
        if section.start() in covered:
            continue
        if own_doc is None:
            stray += 1
        else:
            found += [(own_doc, n) for n in section.groups() if n]
    return found, stray + text.count("§") - len(SECTION.findall(text))


def test_the_reference_documents_number_their_sections():
    for doc in DOCS:
        numbers = headings(doc)
        assert {"1", "2"} <= numbers, f"docs/{doc}.md has no numbered sections"
    assert {f"3.{n}" for n in range(1, 26)} <= headings("methods"), \
        "each decision of methods §3 is a heading of its own"


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_section_reference_resolves(path):
    own = path.stem if path.parent == ROOT / "docs" and path.stem in DOCS else None
    text = path.read_text(encoding="utf-8")
    found, stray = citations(text, own)
    assert stray == 0, (f"{path.name}: a section sign that names no document; cite a "
                        "section as 'methods §3.14', 'design §4' or 'datasets §2'")
    known = {doc: headings(doc) for doc in DOCS}
    missing = sorted({f"{doc} §{n}" for doc, n in found if n not in known[doc]})
    assert not missing, f"{path.name} cites sections that docs/ does not have: {missing}"


def test_no_reference_to_documents_outside_the_repository():
    pattern = re.compile(r"\b(METHODS|DESIGN|DATASETS|ENVIRONMENT)(\.md| §)")
    for path in sources():
        hits = pattern.findall(path.read_text(encoding="utf-8"))
        assert not hits, f"{path.name} names {hits}: cite docs/ instead"


def test_the_readme_links_the_reference_documents():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for doc in DOCS:
        assert f"(docs/{doc}.md)" in readme, f"README does not link docs/{doc}.md"


def test_the_citation_check_catches_a_missing_section_and_a_bare_sign():
    found, stray = citations("see methods §3.14 and datasets §1, §5; also §9", None)
    assert found == [("methods", "3.14"), ("datasets", "1"), ("datasets", "5")]
    assert stray == 1
    assert "99.1" not in headings("methods")
