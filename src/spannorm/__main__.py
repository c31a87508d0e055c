import sys

from spannorm.cli.main import main

sys.exit(main())
