"""vhost-user back-end: message codec (codec.py), session state machine
(session.py) and session replay (replay.py), all sans-I/O."""
