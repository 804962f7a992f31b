"""Settings dataclasses that describe themselves: each field carries its help text and, where the set of values
is closed, its choices. The CLI builds its flags from them, and ``check_choices`` validates every closed field,
so a new choice is declared once."""

from __future__ import annotations

from dataclasses import Field, field, fields
from typing import Any

# Closed sets that torch-free settings check and the models implement (declared once, here).
ENCODER_NAMES = ("ar", "dual", "bert4rec")  # the user encoders `fed_userllm.models.ENCODERS` builds
ITEM_FEATURES = ("learned", "public")  # how an encoder represents items (`fed_userllm.models.layers`)
INTEGRATION_NAMES = ("xattn", "softprompt")  # how user tokens enter the LLM (`fed_userllm.models.integrations`)

def setting(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A dataclass field with its help text and (optional) closed set of values."""
    return field(default=default, metadata={"help": help, "choices": choices})


def help_of(f: Field) -> str:
    return f.metadata.get("help", "")


def choices_of(f: Field) -> tuple | None:
    return f.metadata.get("choices")


def check_choices(settings: Any) -> None:
    """Raise ``ValueError`` naming the first field whose value is not one of its declared choices."""
    for f in fields(settings):
        value, choices = getattr(settings, f.name), choices_of(f)
        if choices is not None and value not in choices:
            raise ValueError(f"{f.name}={value!r}: expected one of {', '.join(map(str, choices))}")


def from_dict(settings_class: type, values: dict, what: str) -> Any:
    """``settings_class(**values)``, refusing unknown keys by name (e.g. a config.json of another version)."""
    known = {f.name for f in fields(settings_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what} settings {unknown}; known: {sorted(known)}")
    return settings_class(**values)
