"""Errors the handlers raise; the server maps each kind to one gRPC status code."""

ECHO_CHARS = 64  # a client's string is echoed in an error message up to this many characters


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    """At most ``limit`` characters of ``text``, then ``...`` when it was cut."""
    return text if len(text) <= limit else text[:limit] + "..."


def echo(text: str) -> str:
    """A client's string for an error message: quoted and clipped, so a 16 KB name costs 70 characters."""
    return repr(clip(text))


class ProtoserveError(Exception):
    """Base of the errors that describe a bad request or a bad archive, never a bug."""


class InvalidInputError(ProtoserveError):
    """A request field is malformed: ``field`` names it (e.g. ``input.shape``), ``detail`` says what is
    wrong; the message is both, so a transport that names the field otherwise can compose its own."""

    def __init__(self, field: str, detail: str):
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


class NotFoundError(ProtoserveError):
    """A model, version, method or component id that does not exist; ``name`` is the client's (echoed clipped)."""

    def __init__(self, kind: str, name: str, known: list[str] | None = None):
        hint = f"; known: {', '.join(known[:20])}{' …' if len(known) > 20 else ''}" if known else ""
        super().__init__(f"{kind} {echo(name)} not found{hint}")
        self.kind = kind


class ArchiveError(ProtoserveError):
    """An archive is malformed, tampered with, or does not match its model."""
