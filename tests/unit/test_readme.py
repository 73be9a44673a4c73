"""The README opens with exactly the two commands CI and newcomers rely on."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_readme_starts_with_two_commands_and_ci_runs_the_second():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block and text.startswith("# faceattend\n\n" + block.group(0))
    commands = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(commands) == 2
    assert commands[0].endswith("edge-agent demo")
    assert "pytest" in commands[1] and "'.[dev]'" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -e '.\\[dev\\]'" in ci  # .ci/run greps this very line out of the README


def test_the_readme_and_docs_point_only_inside_the_repository():
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        assert "../shared" not in text and "DESIGN.md" not in text, doc
        for target in re.findall(r"\]\(([^)#]+)\)", text):  # markdown links: each must exist in the clone
            if not target.startswith(("http://", "https://")):
                assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which is not in the repository"
    assert "(docs/architecture.md)" in (ROOT / "README.md").read_text()
