import sys

from fediomt.cli import main

sys.exit(main())
