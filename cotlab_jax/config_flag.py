"""The `--config=FILE.py[:arg]` flag of the lab's commands (an ml_collections config file, with
`--config.<field>=value` overrides), and a flags parser for `app.run`: a config file that
cannot be loaded, or any other bad flag, ends the command with one line naming it, no traceback.
"""

import importlib.machinery
import importlib.util
import sys

from absl import flags
from ml_collections import config_flags


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    # A ValueError's message is written for the user; other exceptions need their type.
    return text if isinstance(error, ValueError) and text else f"{type(error).__name__}: {text}"


class _ConfigFileParser(flags.ArgumentParser):
    """Loads `FILE.py[:arg]` and returns `get_config([arg])`, locked; any exception the file
    raises becomes a ValueError of one line (flags report it as the flag's error). It replaces
    ml_collections' parser, which puts the traceback into the message."""

    def __init__(self, name: str):
        self.name = name

    def flag_type(self) -> str:
        return "config object"

    def parse(self, argument: str):
        path, has_arg, arg = argument.partition(":")
        try:
            loader = importlib.machinery.SourceFileLoader(f"{self.name}_config", path)
            module = importlib.util.module_from_spec(
                importlib.util.spec_from_loader(loader.name, loader)
            )
            loader.exec_module(module)
            config = module.get_config(*([arg] if has_arg else []))
        except Exception as error:  # whatever the file raises, reported in one line
            raise ValueError(_first_line(error)) from None  # flags name the flag and its value
        if config is None:
            raise ValueError("get_config() returned None")
        config.lock()
        return config


def load_config_file(argument: str, name: str = "config"):
    """`get_config([arg])` of `FILE.py[:arg]`, locked; a file that fails to load raises a
    ValueError of one line."""
    return _ConfigFileParser(name).parse(argument)


def define_config_flag(
    name: str = "config", help_string: str = "Config file (configs/*.py[:arg])."
) -> flags.FlagHolder:
    holder = config_flags.DEFINE_config_file(name, None, help_string, lock_config=True)
    flags.FLAGS[name].parser = _ConfigFileParser(name)
    return holder


def overridden_fields(name: str = "config") -> list[str]:
    """The dotted paths the command line overrode (`--config.data.vocab_size=64` gives
    `data.vocab_size`)."""
    return list(config_flags.get_override_values(flags.FLAGS[name]))


def parse_flags(argv: list[str]) -> list[str]:
    """`app.run`'s flags parser: a bad flag (a config file that fails to load among them) exits
    with `error: <one line>`."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:  # absl's message names the flag and its value
        sys.exit(f"error: {str(error).strip().splitlines()[0]}")
    except Exception as error:  # ml_collections raises these for an override of no field
        sys.exit(
            f"error: the flags do not parse ({_first_line(error)}); does every "
            "--config.<field> override name a field of the config?"
        )
