import sys

from idgate.cli import main

sys.exit(main())
