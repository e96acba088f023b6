"""The test suite's package; set-up that must come before any test module is imported.

The suite forks itself (tests/helpers/fork.py and the sandbox tests) after tests/daemon used
gRPC's client in this process. With gRPC's fork support on (its default), every ``fork()`` runs
gRPC's handlers: the child restarts gRPC's threads and descriptors (a test counting a child's
descriptors sees them), and a fork after ``unshare(CLONE_NEWPID)`` makes gRPC retry
``pthread_create`` (EINVAL in that process) for seconds. The children here never call gRPC, so
it must not follow them. The daemon and the spawner do not need this: they never fork a process
that loaded gRPC (house rule 7).
"""

import os

os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"
