"""The celebgen.py commands a reader copies (the top docstring's, README's code blocks) are ones its
parser accepts: a renamed or removed flag fails here, not in a user's terminal."""
import re
import shlex
from pathlib import Path

import pytest

import celebgen as cg

ROOT = Path(__file__).resolve().parents[1]


def commands(text):
    """The argument lists of `celebgen.py ...` lines of text, with their backslash continuations
    joined and "[--optional flag]" notation dropped."""
    text = text.replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        if "celebgen.py " in line and not line.lstrip().startswith("#"):
            args = line.split("celebgen.py ", 1)[1].split("#", 1)[0]
            found.append(shlex.split(re.sub(r"\[[^\]]*\]", "", args)))
    return found


def readme_code():
    return "\n".join(re.findall(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M))


DOCUMENTED = commands(cg.__doc__) + commands(readme_code())


def test_the_documents_hold_the_commands():
    assert len(commands(cg.__doc__)) >= 8 and len(commands(readme_code())) >= 10


@pytest.mark.parametrize("argv", DOCUMENTED, ids=" ".join)
def test_a_documented_command_parses(argv):
    parser, _ = cg.make_parser()
    args = parser.parse_args(argv)
    assert args.command == argv[0]


def test_the_defaults_readme_names_are_the_parsers():
    """README's Training section lists the CPU recipe as flags and values; they are train's defaults."""
    listed = re.search(r"The defaults \(`([^`]*)`\)", (ROOT / "README.md").read_text().replace("\n", " "))
    pairs = shlex.split(listed.group(1))
    _, train = cg.make_parser()
    assert len(pairs) >= 16
    for flag, value in zip(pairs[::2], pairs[1::2]):
        parse = train._option_string_actions[flag].type or str
        assert train.get_default(flag[2:]) == parse(value), flag
