"""The README documents every feature: a section of it once went missing in an
unrelated edit, so these checks name what must stay there."""
import ast
import pathlib
import re

import pytest

import memfast
from memfast import _stats, cli, integrations

README = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


def mentioned(name):
    return re.search(rf"\b{re.escape(name)}\b", README) is not None


@pytest.mark.parametrize("name", [n for n in memfast.__all__ if not n.startswith("_")])
def test_public_api_is_documented(name):
    assert mentioned(name), f"memfast.{name} is exported but the README never mentions it"


@pytest.mark.parametrize("name", ["XRM", "shift_table", "argmax_shift_table", "held_out_logits", "inferred_groups",
                                  "spurious_features", "colored_digits", "worst_group_accuracy"])
def test_mat_recipe_is_documented(name):
    assert mentioned(name), f"the MAT recipe's {name} is missing from the README"


@pytest.mark.parametrize("name", integrations.__all__ + ["TrackerCallback"])
def test_integrations_are_documented(name):
    assert mentioned(name), f"memfast.integrations' {name} is missing from the README"


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_cli_commands_are_documented(command):
    assert f"memfast {command}" in README, f"`memfast {command}` is missing from the README"


@pytest.mark.parametrize("stat", _stats.ALL_USER_STATS)
def test_tracker_statistics_are_documented(stat):
    assert f"| `{stat}` |" in README, f"statistic {stat!r} has no row in the README's statistics table"


@pytest.mark.parametrize("method", ["update", "end_epoch", "scores", "save", "load", "state_dict", "load_state_dict",
                                    "all_reduce", "check"])
def test_tracker_methods_are_documented(method):
    assert re.search(rf"\b{method}\(", README), f"SampleTracker.{method} is missing from the README"


@pytest.mark.parametrize("function", ["cross_entropy", "linear_cross_entropy"])
def test_loss_arguments_are_documented(function):
    import inspect

    for name in inspect.signature(getattr(memfast, function)).parameters:
        if name not in ("size_average", "reduce"):  # PyTorch's deprecated pair, accepted for drop-in use
            assert re.search(rf"`[^`]*\b{name}\b[^`]*`", README), f"memfast.{function}'s {name} is missing from the README"


def test_readme_has_python_examples():
    assert len(PYTHON_BLOCKS) >= 10


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_examples_parse(index):
    ast.parse(PYTHON_BLOCKS[index])
