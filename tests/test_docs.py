"""The celebgen.py and fid.py commands a reader copies (the top docstrings', and those of README.md
and RESULTS.md: their ```bash blocks and their inline `python celebgen.py ...` spans) are ones their
parsers accept: a renamed or removed flag fails here, not in a user's terminal. And the defaults
README names are the code's."""
import re
import shlex
from pathlib import Path

import pytest

import celebgen as cg
import fid

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = ("README.md", "RESULTS.md")


def commands(text, program="celebgen.py"):
    """The argument lists of `celebgen.py ...` (or `fid.py ...`) lines of text, with their backslash
    continuations joined and "[--optional flag]" notation dropped."""
    text = text.replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        parts = re.split(rf"(?:^|\s){re.escape(program)} ", line, maxsplit=1)  # not benchmark_fid.py
        if len(parts) == 2 and not line.lstrip().startswith("#"):
            args = parts[1].split("#", 1)[0]
            found.append(shlex.split(re.sub(r"\[[^\]]*\]", "", args)))
    return found


def code(name):
    """The ```bash blocks of a document, and its inline `python celebgen.py ...` spans (which may
    wrap across lines), one command a line."""
    text = (ROOT / name).read_text()
    blocks = re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    spans = [span.replace("\n", " ") for span in re.findall(r"`(python celebgen\.py [^`]*)`", prose)]
    return "\n".join(blocks + spans)


DOCUMENTED = commands(cg.__doc__) + [argv for name in DOCUMENTS for argv in commands(code(name))]
FID_DOCUMENTED = commands(fid.__doc__, "fid.py") + [
    argv for name in DOCUMENTS for argv in commands(code(name), "fid.py")]


def test_the_documents_hold_the_commands():
    assert len(commands(cg.__doc__)) >= 8
    assert len(commands(code("README.md"))) >= 10 and len(commands(code("RESULTS.md"))) >= 5
    assert len(commands(fid.__doc__, "fid.py")) >= 4 and len(FID_DOCUMENTED) >= 8


@pytest.mark.parametrize("argv", DOCUMENTED, ids=" ".join)
def test_a_documented_command_parses(argv):
    parser, _ = cg.make_parser()
    args = parser.parse_args(argv)  # a bad flag or value raises UserError: the test fails
    assert args.command == argv[0]


@pytest.mark.parametrize("argv", FID_DOCUMENTED, ids=" ".join)
def test_a_documented_fid_command_parses(argv):
    fid.make_parser().parse_args(argv)  # a bad flag or value raises UserError: the test fails


def test_fid_scores_what_sample_draws_by_default():
    """The same checkpoint, sampler, steps and times: fid.py's default FID is that of sample's images."""
    parser, _ = cg.make_parser()
    sample = parser.parse_args(["sample", "--exp_name", "e"])
    scored = fid.make_parser().parse_args(["--exp_name", "e"])
    for flag in ("checkpoint", "method", "num_sampling_steps", "time_power", "cfg_scale", "autoguidance"):
        assert getattr(scored, flag) == getattr(sample, flag), flag


def test_the_defaults_readme_names_are_the_parsers():
    """README's Training section lists the CPU recipe as flags and values; they are train's defaults."""
    listed = re.search(r"The defaults \(`([^`]*)`\)", (ROOT / "README.md").read_text().replace("\n", " "))
    words = shlex.split(listed.group(1))
    pairs = list(zip(words[::2], words[1::2]))
    _, train = cg.make_parser()
    assert len(words) == 2 * len(pairs) and len(pairs) >= 16
    for flag, value in pairs:
        parse = train._option_string_actions[flag].type or str
        assert train.get_default(flag[2:]) == parse(value), flag


def test_the_sampling_defaults_readme_names_are_the_codes():
    """README's "Sampling and FID" states sample's and fid.py's defaults: steps, sampler, where the
    last step starts, the autoguidance weight and the guide's age. Each is what the code uses."""
    text = (ROOT / "README.md").read_text().replace("\n", " ")
    steps, method, last = re.search(r"its EMA and (\d+) (\w+) steps whose last starts at t = ([\d.]+)",
                                    text).groups()
    parser, _ = cg.make_parser()
    sample = parser.parse_args(["sample", "--exp_name", "e"])
    assert int(steps) == sample.num_sampling_steps == cg.SAMPLING_STEPS
    assert method.lower() == sample.method and float(last) == cg.LAST_STEP_FROM
    assert cg.time_grid(sample.num_sampling_steps)[-2] == pytest.approx(cg.LAST_STEP_FROM)
    weight = float(re.search(r"x_guide \+ w \(x_model − x_guide\) with w = ([\d.]+)", text).group(1))
    assert weight == cg.AUTOGUIDANCE
    age = re.search(r"`guide.pt` \(the EMA at (\d+)% of the run", text).group(1)
    assert int(age) / 100 == cg.GUIDE_AT


def test_the_readme_stays_short():
    """README is read by a newcomer in minutes: at most 250 lines; the figures live in RESULTS.md."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250
