"""The built-in attacks. ``ORDER`` is the order of their columns in the published schemas,
whatever order their modules happen to be imported in."""

from . import caption, encodermi, idia, mim, partcrop  # noqa: F401  (each module registers itself)

ORDER = ("idia", "encodermi", "partcrop", "mim", "caption")
