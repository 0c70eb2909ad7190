"""The names versions and aliases may have: the registry checks them when they are made, the serving container
when it is told which to serve, and the chart's values.schema.json keeps a copy (a test holds the two equal)."""

from __future__ import annotations

import re

VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # an alias is a version name too
ALIAS_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")  # starts with a letter: never an automatic version
