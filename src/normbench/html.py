"""The Jinja2 environment of normbench's HTML pages (the report and the comparison), which share one style sheet."""

from __future__ import annotations

from importlib.resources import files

import jinja2


def environment() -> jinja2.Environment:
    """Templates from the package's templates/ folder; every value escaped, an undefined name an error."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(files("normbench").joinpath("templates"))),
                              autoescape=True, undefined=jinja2.StrictUndefined)
