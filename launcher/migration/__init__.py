"""Live migration of a VM between two mplaunch instances.

Theory of operation (docs/management.md, "Live migration"): the source's
mplaunch opens two connections to one URI, the state channel
(:mod:`launcher.migration.channel`) and QEMU's migration stream, which it
hands to its QEMU. The destination's mplaunch tells them apart by their
first bytes (:func:`launcher.migration.channel.classify`), hands QEMU's to
its own QEMU, and answers the state channel. The pure parts (URIs, the
channel's codec and state machine, the status a `query-migrate` reports)
are sans-I/O; :mod:`~launcher.migration.source` and
:mod:`~launcher.migration.destination` are the thin drivers around them.
"""
