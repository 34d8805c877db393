"""The docs stay true to the tree: links resolve, every runtime module is on the architecture page and every module
named there exists, and the command reports its version."""
import re
import subprocess
import sys
from pathlib import Path

import dynfocus_infer

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_relative_links_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_every_runtime_module_is_on_the_architecture_page_and_no_other():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    modules = {p.name for p in (ROOT / "dynfocus_infer").rglob("*.py") if p.name != "__init__.py"}
    named = set(re.findall(r"`(?:models/)?(\w+\.py)`", text)) | set(re.findall(r"\b(\w+\.py)\b", text))
    assert modules - named == set(), "modules missing from docs/ARCHITECTURE.md"
    kernel_and_bench = {p.name for p in (ROOT / "kernels").glob("*.py")} | {p.name for p in ROOT.rglob("*.py")}
    assert named - modules - kernel_and_bench == set(), "docs/ARCHITECTURE.md names files that do not exist"


def test_design_sections_cited_in_the_code_exist():
    headings = set(re.findall(r"^## (\d+)\.", (ROOT / "docs" / "DESIGN.md").read_text(), re.M))
    cited = set()
    for path in (ROOT / "dynfocus_infer").rglob("*.py"):
        cited |= set(re.findall(r"DESIGN(?:\.md)? section (\d+)", path.read_text()))
    assert cited and cited <= headings, f"cited sections {sorted(cited - headings)} are not in docs/DESIGN.md"


def test_version_flag():
    result = subprocess.run([sys.executable, "-m", "dynfocus_infer.cli", "--version"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"dynfocus-infer {dynfocus_infer.__version__}"
