"""mplaunch's management plane: a QMP-compatible socket, its commands and events.

``protocol`` is the sans-I/O QMP server side (bytes in, requests out;
replies and events in, bytes out), ``commands`` validates arguments and
dispatches onto a ``VmControl``, ``events`` names every event and its data,
and ``server`` is the thin asyncio layer around them.
"""
