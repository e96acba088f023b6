"""Policy files: a directory of them loaded into an immutable :class:`PolicyBundle`.

A rule is static (``match:``, judged on the command line) or an effect rule (``effect:``,
judged on what the dry run did). Loading is all or nothing: any problem rejects the bundle
with a :class:`PolicyError` listing every one as ``file:line:column: message (hint)``. Also
here, for ``airlock policy test``: :func:`run_inline_tests`, :func:`read_fixtures` and
:func:`run_fixture`.

From the ground up: ``_yaml`` (YAML with positions), ``_problems``, ``_files``, ``_schema``,
``_compile``, ``_tests`` (inline tests, fixture files) and ``_load`` (the loading itself).
"""

from airlock.policy._schema import SchemaCheck as SchemaCheck
from airlock.policy._schema import check_in_child as check_in_child
from airlock.policy._schema import check_in_process as check_in_process
from airlock.policy.loader._compile import PolicyBundle as PolicyBundle
from airlock.policy.loader._files import MAX_FILE_BYTES as MAX_FILE_BYTES
from airlock.policy.loader._load import load_bundle as load_bundle
from airlock.policy.loader._load import read_effects_file as read_effects_file
from airlock.policy.loader._load import snapshot as snapshot
from airlock.policy.loader._problems import PolicyError as PolicyError
from airlock.policy.loader._problems import PolicyProblem as PolicyProblem
from airlock.policy.loader._tests import FixtureCase as FixtureCase
from airlock.policy.loader._tests import iter_fixture_files as iter_fixture_files
from airlock.policy.loader._tests import read_fixtures as read_fixtures
from airlock.policy.loader._tests import run_fixture as run_fixture
from airlock.policy.loader._tests import run_inline_tests as run_inline_tests
from airlock.policy.loader._yaml import MAX_DEPTH as MAX_DEPTH
