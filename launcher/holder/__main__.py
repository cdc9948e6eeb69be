"""``python -I -m launcher.holder SOCKET_PATH [IDLE_EXIT_S]``: run a VM's holder."""

import sys

from launcher.holder.main import main

sys.exit(main(sys.argv[1:]))
