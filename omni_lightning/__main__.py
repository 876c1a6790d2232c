import sys

from omni_lightning.app.cli import main

sys.exit(main())
