"""The wire edge shared by the daemon and the client.

:mod:`airlock.api.convert`: protobuf ⇄ :mod:`airlock.types`, the one conversion module.
:mod:`airlock.api.status`: :mod:`airlock._errors` ⇄ gRPC status, the one mapping.
"""
