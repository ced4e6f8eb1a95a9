"""ConfigError and the wording every config message shares."""

from smartfed.errors import SmartFedError


class ConfigError(SmartFedError, ValueError):
    """A configuration problem: ``source`` (a file, ``--set``, a run config) and the dotted
    ``key`` path it concerns; ``str()`` is one line."""

    def __init__(self, message, *, key=None, source=None):
        super().__init__(message)
        self.message = " ".join(str(message).split())
        self.key = key
        self.source = None if source is None else str(source)

    def __str__(self):
        return ": ".join(part for part in (self.source, self.key, self.message) if part)

    def located(self, *, source=None, prefix=None) -> "ConfigError":
        """This error with ``source`` (when it has none) and ``prefix`` prepended to its key."""
        key = join_key(prefix, self.key) if prefix else self.key
        return ConfigError(self.message, key=key, source=self.source or source)


def join_key(*parts) -> str:
    """``a.b[3].c`` from ("a", "b", 3, "c"); empty and None parts are skipped."""
    text = ""
    for part in parts:
        if part is None or part == "":
            continue
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            part = str(part)
            text += part if not text or part.startswith("[") else f".{part}"
    return text


def describe(value) -> str:
    """How a message names a value the user gave."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, (dict, list)):
        return f"a {'mapping' if isinstance(value, dict) else 'list'}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        # str() of an int past 4300 digits raises; the size is what the message needs.
        return f"an integer of about {round(abs(value).bit_length() * 0.30103)} digits"
    return repr(value)


def number_hint(value) -> str:
    """Why a string that reads as a number is not one."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        if "e" in value.lower():
            return " (YAML reads an exponent without a dot as a string: write 1.0e-2, not 1e-2)"
        return " (remove the quotes)"
    return ""
