"""Every shape suffix in the package uses letters of the one legend in torchmoe/__init__.py, and
every file that declares a legend draws it from there."""

import ast
import re
from pathlib import Path

import torchmoe

PACKAGE = Path(torchmoe.__file__).parent
SUFFIX = re.compile(r"^[a-z][a-z0-9_]*?_([A-Z1]*[A-Z][A-Z1]*)$")


def legend() -> dict[str, str]:
    """Letter -> meaning, from the package docstring's '- X: meaning' lines."""
    return dict(re.findall(r"^- (\w): (.+)$", torchmoe.__doc__, flags=re.M))


def suffixed_names(path: Path) -> set[str]:
    """Variables, arguments and attributes named with a shape suffix."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
    return {n for n in names if SUFFIX.match(n)}


def test_the_legend_gives_each_letter_one_meaning():
    letters = re.findall(r"^- (\w):", torchmoe.__doc__, flags=re.M)
    assert len(letters) == len(set(letters)) > 20


def test_every_shape_suffix_uses_legend_letters():
    known = set(legend())
    unknown = {
        f"{path.relative_to(PACKAGE)}: {name}"
        for path in PACKAGE.rglob("*.py")
        for name in suffixed_names(path)
        if set(SUFFIX.match(name).group(1)) - known
    }
    assert not unknown, sorted(unknown)


def test_file_legends_point_at_the_package_legend():
    stray = [
        str(p.relative_to(PACKAGE))
        for p in PACKAGE.rglob("*.py")
        if re.search(r"^(Legend|Shapes):", p.read_text(), flags=re.M)
    ]
    assert not stray, stray
