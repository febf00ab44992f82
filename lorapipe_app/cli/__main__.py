import sys

from lorapipe_app.cli import main

sys.exit(main())
