import sys

from exporter.agent import main

sys.exit(main())
