import sys

from elastune.cli.main import main

sys.exit(main())
