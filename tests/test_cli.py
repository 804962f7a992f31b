"""The command line: a torch-free parser, self-describing flags, errors in flag names, quiet by default."""

import argparse
import os
import subprocess
import sys
import textwrap
from dataclasses import fields

import pytest

from fed_userllm import cli
from fed_userllm.serving.config import ServingConfig
from fed_userllm.settings import choices_of
from fed_userllm.train import contextualize_config, pretrain_config
from fed_userllm.train.contextualize_config import ContextualizeConfig
from fed_userllm.train.pretrain_config import PretrainConfig

HEAVY = ("torch", "numpy", "pandas", "transformers", "peft", "flwr", "opacus", "executorch", "fastapi", "uvicorn")


def commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(command words, parser) of every leaf command, e.g. (("data", "describe"), parser)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*prefix, name))
            return
    yield prefix, parser


def run_python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=300, env=env)


def test_the_parser_and_every_help_page_import_no_heavy_library():
    """What makes `fed-userllm --help` instant; counted in a fresh process, not timed."""
    code = """
        import contextlib, io, sys
        from fed_userllm.cli import build_parser
        for words in (["--help"], ["data", "--help"], ["data", "describe", "--help"], ["pretrain", "--help"],
                      ["contextualize", "--help"], ["serve", "--help"], ["export", "--help"], ["deploy", "--help"]):
            with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()) as shown:
                build_parser().parse_args(words)
            assert "usage: fed-userllm" in shown.getvalue()
        print(" ".join(sorted({m.split(".")[0] for m in sys.modules})))
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    loaded = set(result.stdout.split())
    assert "argparse" in loaded and not loaded & set(HEAVY), loaded & set(HEAVY)


def test_every_flag_has_help_its_real_default_and_boolean_negation():
    for words, parser in commands(cli.build_parser()):
        text = parser.format_help()
        assert "(default: None)" not in text, words
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, (words, action.dest)
            assert not isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction) or \
                action.dest == "verbose", (words, action.dest)  # booleans take --flag / --no-flag
    help_text = dict(commands(cli.build_parser()))[("contextualize",)].format_help()
    assert "--perceiver, --no-perceiver" in help_text and "(default: True)" in help_text
    assert "--lr LR" in help_text and "(default: 0.001)" in help_text


@pytest.mark.parametrize("settings_class,command", [(PretrainConfig, "pretrain"), (ContextualizeConfig,
                                                                                    "contextualize"),
                                                    (ServingConfig, "serve")])
def test_settings_become_flags_with_their_defaults_and_choices(settings_class, command):
    parser = dict(commands(cli.build_parser()))[(command,)]
    actions = {a.dest: a for a in parser._actions}
    for f in settings_class.__dataclass_fields__.values():
        action = actions[f.name]
        assert action.option_strings[0] == f"--{f.name.replace('_', '-')}"
        assert action.default == f.default and tuple(action.choices or ()) == (choices_of(f) or ())
    required = {"pretrain": ["--out", "x"], "contextualize": ["--out", "x"], "serve": ["--model", "x"]}[command]
    args = cli.build_parser().parse_args([command, *required])
    if settings_class is not ContextualizeConfig:  # needs an encoder to be valid
        assert cli.settings_from_args(settings_class, args) == settings_class()


def test_closed_sets_name_what_the_code_implements():
    """The torch-free name lists the CLI offers equal the registries that build the objects."""
    from fed_userllm.models import ENCODERS, textprompt, userllm
    from fed_userllm.models.integrations import INTEGRATIONS
    from fed_userllm.models.layers import DEFAULT_FEATURE_DIMS, ITEM_FEATURES
    from fed_userllm.tasks import TASKS

    assert set(contextualize_config.TASK_NAMES) == set(TASKS)
    assert contextualize_config.STRATEGIES == userllm.STRATEGIES
    assert contextualize_config.USER_TOKENS == userllm.USER_TOKENS
    assert choices_of(next(f for f in fields(ContextualizeConfig) if f.name == "integration")) == tuple(INTEGRATIONS)
    assert set(textprompt.STRATEGIES) < set(userllm.STRATEGIES)
    assert pretrain_config.ENCODER_NAMES == tuple(ENCODERS)
    assert pretrain_config.ITEM_FEATURES == ITEM_FEATURES
    assert PretrainConfig().item_dim == DEFAULT_FEATURE_DIMS["item"]


def test_booleans_reject_typos_and_verbose_goes_anywhere(capsys):
    parser = cli.build_parser()
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["contextualize", "--out", "x", "--perceiver", "flase"])
    assert exit_.value.code == 2 and "unrecognized arguments: flase" in capsys.readouterr().err
    assert parser.parse_args(["contextualize", "--out", "x", "--no-perceiver"]).perceiver is False
    assert parser.parse_args(["contextualize", "--out", "x"]).perceiver is True
    assert parser.parse_args(["-v", "data", "describe"]).verbose is True
    assert parser.parse_args(["data", "describe", "-v"]).verbose is True
    assert parser.parse_args(["data", "describe"]).verbose is False
    with pytest.raises(SystemExit):
        parser.parse_args(["pretrain", "--out", "x", "--model", "gru"])
    assert "invalid choice: 'gru'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the old spelling of the TextPrompt baseline; --help names the new one
        parser.parse_args(["contextualize", "--out", "x", "--integration", "text"])
    assert "invalid choice: 'text'" in capsys.readouterr().err
    assert parser.parse_args(["contextualize", "--out", "x", "--method", "textprompt"]).method == "textprompt"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["contextualize", "--out", "OUT", "--encoder", "x", "--encoder-lr", "-1"], "--encoder-lr=-1.0: expected >= 0"),
        (["contextualize", "--out", "OUT", "--encoder", "x", "--user-tokens", "next_item"], "set --no-perceiver"),
        (["contextualize", "--out", "OUT", "--objective", "catalog", "--task", "reviewg"],
         "it needs --task='nextitem' or 'favgenre', --integration='xattn', --text-history-len=0"),
        (["contextualize", "--out", "OUT"], "--method='userllm' needs --encoder= (a pretraining run directory)"),
        (["pretrain", "--out", "OUT", "--epochs", "0"], "--epochs=0: expected >= 1"),
        (["serve", "--model", "x", "--max-batch-size", "0"], "--max-batch-size=0: expected a positive integer"),
    ],
)
def test_errors_name_the_flag_the_user_typed(tmp_path, capsys, argv, message):
    assert cli.main([str(tmp_path / "run") if word == "OUT" else word for word in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert "_lr=" not in err and "_len=" not in err and "max_batch_size" not in err
    assert not (tmp_path / "run").exists()


def test_flag_names_leave_other_words_alone():
    parser = dict(commands(cli.build_parser()))[("contextualize",)]
    message = "history_len=20 exceeds the encoder's max_len=11 (see run/history_len=3, x.lr=1)"
    assert cli.flag_names(message, parser) == ("--history-len=20 exceeds the encoder's max_len=11 "
                                               "(see run/history_len=3, x.lr=1)")


@pytest.mark.parametrize("verbose", [False, True])
def test_third_party_noise_only_with_verbose_project_messages_always(verbose):
    """torchao's import really logs "Failed to load ... .so" lines and torch `_pytree` deprecations."""
    code = """
        import logging, sys, warnings
        from fed_userllm.cli import console
        with console(verbose=sys.argv[1] == "-v"):
            import torchao  # noqa: F401
            logging.getLogger("torch.utils._pytree").warning("torch-internal-record")
            logging.getLogger("somelib").warning("third-party-record")
            warnings.warn("third-party-warning", DeprecationWarning)
            warnings.warn_explicit("project-warning", UserWarning, "movielens.py", 1,
                                   module="fed_userllm.data.movielens")
            logging.getLogger("fed_userllm.serving").warning("project-record")
    """
    environment = {k: v for k, v in os.environ.items() if k not in cli.QUIET_ENV}  # as a user's shell has it
    result = run_python(code, "-v" if verbose else "-q", env=environment)
    assert result.returncode == 0, result.stderr
    assert "project-warning" in result.stderr and "project-record" in result.stderr
    third_party = ("torch-internal-record", "third-party-record", "third-party-warning")
    if verbose:
        assert all(text in result.stderr for text in third_party), result.stderr
    else:
        assert not any(text in result.stderr for text in (*third_party, "Failed to load", "_pytree")), result.stderr
        assert all("project-" in line for line in result.stderr.splitlines()), result.stderr


def test_main_leaves_the_process_as_it_found_it(capsys):
    """Commands run inside tests and other programs: the quiet settings end with the command."""
    import logging
    import warnings

    before = (logging.getLogger().level, logging.getLogger().handlers[:], warnings.filters[:],
              {name: os.environ.get(name) for name in cli.QUIET_ENV})
    assert cli.main(["pretrain", "--out", "unused", "--epochs", "0"]) == 2
    after = (logging.getLogger().level, logging.getLogger().handlers[:], warnings.filters[:],
             {name: os.environ.get(name) for name in cli.QUIET_ENV})
    assert after == before


def test_quiet_mode_drops_what_native_code_writes_to_stderr_and_verbose_keeps_it(capfd, monkeypatch):
    """Native libraries (the ExecuTorch runtime's cpuinfo probe) write to file descriptor 2 directly, past logging:
    the CLI's quiet mode drops it, -v keeps it, and the descriptor is restored either way."""
    from fed_userllm.runtime import QUIET_NATIVE_ENV, quiet_native_stderr

    for verbose in (False, True):
        monkeypatch.delenv(QUIET_NATIVE_ENV, raising=False)
        with cli.console(verbose), quiet_native_stderr():
            os.write(2, b"native diagnostic\n")
        os.write(2, b"after\n")
        err = capfd.readouterr().err
        assert ("native diagnostic" in err) == verbose and "after" in err
    assert QUIET_NATIVE_ENV not in os.environ  # console() restores the environment
