import sys

from otel_audit.cli import main

sys.exit(main())
