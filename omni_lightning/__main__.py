import sys

from omni_lightning.cli import main

sys.exit(main())
