import sys

from exporter.adapter.main import main

sys.exit(main())
