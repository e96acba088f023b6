"""Static analysis of a bash command line: every simple command it can run.

``analyze(command)`` parses the line with tree-sitter-bash and builds the command model
(:mod:`airlock.policy.model`): each simple command wherever it sits, quotes removed, flags
split, redirects, wrappers unwrapped, and a coarse classification. Pure and thread-safe; it
never raises: what it cannot analyse becomes a finding (the ids below).

From the ground up: ``_catalog`` (data/commands.yaml and data/wrappers.yaml), ``_words``
(quote removal), ``_draft`` (the analysis under construction), ``_classify`` (action, risk,
scope, read-only), ``_unwrap`` (wrappers, strings run as command lines, decode-to-shell),
``_walker`` (the walk over the syntax tree) and ``_analyze`` (the entry point, and the
conventions of the model).
"""

from airlock.policy.shell._analyze import analyze as analyze
from airlock.policy.shell._catalog import BUILTIN as BUILTIN
from airlock.policy.shell._catalog import Catalog as Catalog
from airlock.policy.shell._draft import DECODE_TO_SHELL as DECODE_TO_SHELL
from airlock.policy.shell._draft import DYNAMIC_COMMAND_NAME as DYNAMIC_COMMAND_NAME
from airlock.policy.shell._draft import DYNAMIC_EVAL as DYNAMIC_EVAL
from airlock.policy.shell._draft import DYNAMIC_SHELL_STRING as DYNAMIC_SHELL_STRING
from airlock.policy.shell._draft import PARSE_ERROR as PARSE_ERROR
from airlock.policy.shell._draft import PARSE_INTERNAL_ERROR as PARSE_INTERNAL_ERROR
from airlock.policy.shell._draft import PARSE_TOO_DEEP as PARSE_TOO_DEEP
from airlock.policy.shell._draft import PARSE_TOO_LARGE as PARSE_TOO_LARGE
