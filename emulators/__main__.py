import sys

from emulators.process import main

sys.exit(main(sys.argv))
