import sys

from mpagent.cli import main

sys.exit(main())
